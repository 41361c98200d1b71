//! ILSVRC-2012's devkit, for the val tar's labels: `data/ILSVRC2012_validation_ground_truth.txt`
//! gives the n-th val image's ILSVRC2012_ID (1-1000, one per line), and `data/meta.mat` maps
//! those ids to wnids (its `synsets` struct array, fields `ILSVRC2012_ID` and `WNID`). The
//! `.mat` file is MATLAB's level-5 format, which this reads as far as the labels need: data
//! elements, compressed ones (zlib) included; matrices of structs, characters and numbers.

use flate2::read::ZlibDecoder;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

const GROUND_TRUTH: &str = "data/ILSVRC2012_validation_ground_truth.txt";
const META: &str = "data/meta.mat";

/// The wnid of each val image by its number (`ILSVRC2012_val_00000001` is 1), from the devkit
/// unpacked at `dir`.
pub fn val_wnids(dir: &Path) -> Result<BTreeMap<u64, String>, String> {
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"));
    let wnid_of = synsets(&read(META)?).map_err(|e| format!("{META}: {e}"))?;
    let truth = String::from_utf8_lossy(&read(GROUND_TRUTH)?).into_owned();
    let mut wnids = BTreeMap::new();
    for (line, text) in truth.lines().enumerate() {
        let id: u32 = text
            .trim()
            .parse()
            .map_err(|_| format!("{GROUND_TRUTH}: line {}: not an ILSVRC2012_ID", line + 1))?;
        let wnid = wnid_of.get(&id).ok_or_else(|| {
            format!(
                "{GROUND_TRUTH}: line {}: id {id} is not in {META}",
                line + 1
            )
        })?;
        wnids.insert(line as u64 + 1, wnid.clone());
    }
    Ok(wnids)
}

/// A MATLAB value, as far as the devkit needs.
#[derive(Debug)]
enum Value {
    Structs(Vec<BTreeMap<String, Value>>),
    Text(String),
    Numbers(Vec<f64>),
    Other,
}

/// `synsets`' ILSVRC2012_ID -> WNID.
fn synsets(mat: &[u8]) -> Result<BTreeMap<u32, String>, String> {
    if mat.len() < 128 || &mat[126..128] != b"IM" {
        return Err("not a little-endian MATLAB level-5 file".into());
    }
    for (kind, data) in elements(&mat[128..])? {
        let (name, value) = match kind {
            COMPRESSED => {
                let mut inflated = Vec::new();
                ZlibDecoder::new(data)
                    .read_to_end(&mut inflated)
                    .map_err(|e| format!("a compressed element: {e}"))?;
                match elements(&inflated)?.into_iter().next() {
                    Some((MATRIX, inner)) => matrix(inner)?,
                    _ => continue,
                }
            }
            MATRIX => matrix(data)?,
            _ => continue,
        };
        if name != "synsets" {
            continue;
        }
        let Value::Structs(synsets) = value else {
            return Err("`synsets` is not a struct array".into());
        };
        let mut map = BTreeMap::new();
        for synset in synsets {
            if let (Some(Value::Numbers(id)), Some(Value::Text(wnid))) =
                (synset.get("ILSVRC2012_ID"), synset.get("WNID"))
                && let Some(&id) = id.first()
            {
                map.insert(id as u32, wnid.clone());
            }
        }
        return Ok(map);
    }
    Err("no `synsets` variable".into())
}

const INT8: u32 = 1;
const UINT8: u32 = 2;
const INT16: u32 = 3;
const UINT16: u32 = 4;
const INT32: u32 = 5;
const UINT32: u32 = 6;
const SINGLE: u32 = 7;
const DOUBLE: u32 = 9;
const MATRIX: u32 = 14;
const COMPRESSED: u32 = 15;
const UTF8: u32 = 16;

/// The data elements of `bytes`: (type, payload).
fn elements(bytes: &[u8]) -> Result<Vec<(u32, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let word = |i: usize| -> Result<u32, String> {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| "cut short".to_owned())
    };
    while at + 8 <= bytes.len() {
        let tag = word(at)?;
        if tag >> 16 != 0 {
            // A small element: type and size in one word, up to 4 bytes of data after it.
            let len = (tag >> 16) as usize;
            out.push((tag & 0xffff, &bytes[at + 4..at + 4 + len.min(4)]));
            at += 8;
        } else {
            let len = word(at + 4)? as usize;
            let data = bytes
                .get(at + 8..at + 8 + len)
                .ok_or_else(|| "an element runs past the end".to_owned())?;
            out.push((tag, data));
            // Compressed elements are not padded; the others end on 8 bytes.
            at += 8 + if tag == COMPRESSED {
                len
            } else {
                len.div_ceil(8) * 8
            };
        }
    }
    Ok(out)
}

/// A matrix element's name and value.
fn matrix(data: &[u8]) -> Result<(String, Value), String> {
    let parts = elements(data)?;
    let [(_, flags), (_, dims), (_, name), rest @ ..] = parts.as_slice() else {
        return Ok((String::new(), Value::Other));
    };
    let class = flags.first().copied().unwrap_or(0);
    let dims: Vec<usize> = dims
        .chunks_exact(4)
        .map(|d| i32::from_le_bytes(d.try_into().unwrap()).max(0) as usize)
        .collect();
    let count: usize = dims.iter().product();
    let name = String::from_utf8_lossy(name).into_owned();
    let value = match class {
        // A struct array: the field names, then each element's fields in order.
        2 => {
            let [(_, length), (_, names), fields @ ..] = rest else {
                return Ok((name, Value::Other));
            };
            let length = length.get(..4).map_or(0, |l| {
                i32::from_le_bytes(l.try_into().unwrap()).max(1) as usize
            });
            let names: Vec<String> = names
                .chunks(length)
                .map(|n| String::from_utf8_lossy(n).trim_end_matches('\0').to_owned())
                .collect();
            let mut structs = Vec::with_capacity(count);
            let mut fields = fields.iter();
            for _ in 0..count {
                let mut one = BTreeMap::new();
                for field in &names {
                    let value = match fields.next() {
                        Some((MATRIX, inner)) => matrix(inner)?.1,
                        _ => Value::Other,
                    };
                    one.insert(field.clone(), value);
                }
                structs.push(one);
            }
            Value::Structs(structs)
        }
        // Characters, stored as UTF-16, UTF-8 or bytes.
        4 => match rest.first() {
            Some((UINT16, text)) => Value::Text(String::from_utf16_lossy(
                &text
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect::<Vec<_>>(),
            )),
            Some((UINT8 | UTF8 | INT8, text)) => {
                Value::Text(String::from_utf8_lossy(text).into_owned())
            }
            _ => Value::Text(String::new()),
        },
        // Numbers of any class, stored in whichever type holds them.
        6..=15 => Value::Numbers(match rest.first() {
            Some((kind, values)) => numbers(*kind, values),
            None => Vec::new(),
        }),
        _ => Value::Other,
    };
    Ok((name, value))
}

fn numbers(kind: u32, bytes: &[u8]) -> Vec<f64> {
    let each = |size: usize, f: &dyn Fn(&[u8]) -> f64| bytes.chunks_exact(size).map(f).collect();
    match kind {
        INT8 => each(1, &|b| b[0] as i8 as f64),
        UINT8 => each(1, &|b| b[0] as f64),
        INT16 => each(2, &|b| i16::from_le_bytes([b[0], b[1]]) as f64),
        UINT16 => each(2, &|b| u16::from_le_bytes([b[0], b[1]]) as f64),
        INT32 => each(4, &|b| i32::from_le_bytes(b.try_into().unwrap()) as f64),
        UINT32 => each(4, &|b| u32::from_le_bytes(b.try_into().unwrap()) as f64),
        SINGLE => each(4, &|b| f32::from_le_bytes(b.try_into().unwrap()) as f64),
        DOUBLE => each(8, &|b| f64::from_le_bytes(b.try_into().unwrap())),
        _ => Vec::new(),
    }
}
