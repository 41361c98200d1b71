//! Named tensors in and out of safetensors files, checked: loading says exactly which names are
//! missing or extra and which shapes or dtypes differ, and changes nothing unless all match.
//!
//! Model weights use torchvision's names (`features.0.0.weight`, ...), so the files load into
//! torchvision with `load_state_dict`; other state lives under a prefix (`ema.`, `optimizer.`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Tensor, nn};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("state does not match the model{}:\n  {}", if .origin.is_empty() { String::new() } else { format!(" ({})", .origin) }, .problems.join("\n  "))]
    Mismatch {
        origin: String,
        problems: Vec<String>,
    },
}

pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, StateError> {
    Tensor::read_safetensors(path).map_err(|e| StateError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Writes `tensors` in safetensors format; views with other layouts (channels-last weights)
/// are written in the standard contiguous order.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), StateError> {
    let contiguous: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(name, t)| (name.as_str(), t.contiguous()))
        .collect();
    Tensor::write_safetensors(&contiguous, path).map_err(|e| StateError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The variables of `vs` under `prefix` (for example `"ema."`), in name order.
pub fn named(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    vars.into_iter()
        .map(|(name, t)| (format!("{prefix}{name}"), t))
        .collect()
}

/// Copies the tensors named `prefix + variable name` into the variables of `vs`.
pub fn load(
    vs: &nn::VarStore,
    tensors: &[(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<(), StateError> {
    load_into(&named(vs, ""), tensors, prefix, origin)
}

/// Copies the tensors named `prefix + target name` into `targets`, after [`check`].
pub fn load_into(
    targets: &[(String, Tensor)],
    tensors: &[(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<(), StateError> {
    let given = matched(targets, tensors, prefix, origin)?;
    tch::no_grad(|| {
        for (name, var) in targets {
            var.shallow_clone().copy_(given[name.as_str()]);
        }
    });
    Ok(())
}

/// Checks that every target has a tensor named `prefix + target name` with its shape and dtype,
/// and that no other name carries the prefix; the error lists every problem.
pub fn check(
    targets: &[(String, Tensor)],
    tensors: &[(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<(), StateError> {
    matched(targets, tensors, prefix, origin).map(|_| ())
}

/// The tensor for each target, by target name, once every one is there and fits.
fn matched<'a>(
    targets: &[(String, Tensor)],
    tensors: &'a [(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<HashMap<&'a str, &'a Tensor>, StateError> {
    let given: HashMap<&str, &Tensor> = tensors
        .iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n, t)))
        .collect();
    let wanted: BTreeMap<&str, &Tensor> = targets.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut problems = Vec::new();
    for (name, var) in &wanted {
        match given.get(name) {
            None => problems.push(format!("missing {prefix}{name} {:?}", var.size())),
            Some(t) if t.size() != var.size() => problems.push(format!(
                "{prefix}{name}: shape {:?}, the model has {:?}",
                t.size(),
                var.size()
            )),
            Some(t) if t.kind() != var.kind() => problems.push(format!(
                "{prefix}{name}: dtype {:?}, the model has {:?}",
                t.kind(),
                var.kind()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&&str> = given.keys().filter(|n| !wanted.contains_key(**n)).collect();
    extra.sort();
    problems.extend(extra.into_iter().map(|n| format!("unexpected {prefix}{n}")));
    if problems.is_empty() {
        Ok(given)
    } else {
        Err(StateError::Mismatch {
            origin: origin.to_owned(),
            problems,
        })
    }
}
