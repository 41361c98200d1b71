//! How a saved message's `f32` reads back whatever it holds. JSON has no NaN or infinity:
//! serde_json writes them as `null` and then refuses to read `null` as a number, so one NaN
//! loss (a bf16 overflow, or a hostile worker) saved in a job's record once made the store
//! unreadable to every later coordinator. Here a finite number is written as a JSON number and
//! the others by name (`"NaN"`, `"inf"`, `"-inf"`); a `null` written before this codec reads
//! as NaN. Used as `#[serde(with = "ladder_proto::saved_f32")]` (and [`vec`] for a `Vec<f32>`).

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};
use std::fmt;

const NAN: &str = "NaN";
const INFINITY: &str = "inf";
const NEG_INFINITY: &str = "-inf";

pub fn serialize<S: Serializer>(value: &f32, serializer: S) -> Result<S::Ok, S::Error> {
    match *value {
        v if v.is_finite() => serializer.serialize_f32(v),
        v if v.is_nan() => serializer.serialize_str(NAN),
        v if v > 0.0 => serializer.serialize_str(INFINITY),
        _ => serializer.serialize_str(NEG_INFINITY),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
    deserializer.deserialize_any(SavedF32)
}

struct SavedF32;

impl<'de> Visitor<'de> for SavedF32 {
    type Value = f32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a number, \"{NAN}\", \"{INFINITY}\", \"{NEG_INFINITY}\" or null"
        )
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f32, E> {
        Ok(v as f32)
    }

    fn visit_f32<E: de::Error>(self, v: f32) -> Result<f32, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f32, E> {
        Ok(v as f32)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f32, E> {
        Ok(v as f32)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f32, E> {
        match v {
            NAN => Ok(f32::NAN),
            INFINITY => Ok(f32::INFINITY),
            NEG_INFINITY => Ok(f32::NEG_INFINITY),
            other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
        }
    }

    /// What serde_json wrote for a non-finite number before this codec.
    fn visit_unit<E: de::Error>(self) -> Result<f32, E> {
        Ok(f32::NAN)
    }

    fn visit_none<E: de::Error>(self) -> Result<f32, E> {
        Ok(f32::NAN)
    }
}

/// The same for each number of a `Vec<f32>`.
pub mod vec {
    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(values.len()))?;
        for v in values {
            seq.serialize_element(&Saved(*v))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        deserializer.deserialize_seq(SavedVec)
    }

    struct Saved(f32);

    impl serde::Serialize for Saved {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            super::serialize(&self.0, serializer)
        }
    }

    impl<'de> serde::Deserialize<'de> for Saved {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Saved, D::Error> {
            super::deserialize(deserializer).map(Saved)
        }
    }

    struct SavedVec;

    impl<'de> Visitor<'de> for SavedVec {
        type Value = Vec<f32>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of numbers")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
            let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(Saved(v)) = seq.next_element()? {
                values.push(v);
            }
            Ok(values)
        }
    }
}
