//! Loading official FS-CT checkpoints and torchvision ResNet weights by name, and freezing the
//! backbone.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use tch::{nn, Tensor};

use super::ModelError;

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Model variables that received a value (official names).
    pub loaded: Vec<String>,
    /// File tensors deliberately not used: `num_batches_tracked`, the ConvBlock duplicates
    /// `feature.trunk.i.trunk.{0,1}.*`, torchvision's `fc.*`, and (when allowed) unknown names.
    pub skipped: Vec<String>,
    /// Model variables left as they were (only with `allow_missing`).
    pub missing: Vec<String>,
}

/// Strictness of [`load_official_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Keep model variables the file lacks (e.g. an official FS-CT checkpoint with the frozen
    /// torchvision backbone, which the official code never saved).
    pub allow_missing: bool,
    /// Ignore file tensors the model lacks.
    pub allow_unexpected: bool,
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Read {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// The `__metadata__` map of a safetensors file (8-byte little-endian header length, then a JSON
/// header).
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let mut f = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| read_err(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(read_err(
            path,
            format!("safetensors header of {len} bytes: not a safetensors file?"),
        ));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| read_err(path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| read_err(path, e))?;
    let mut out = BTreeMap::new();
    if let Some(meta) = json.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in meta {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            out.insert(k.clone(), v);
        }
    }
    Ok(out)
}

/// The official ConvBlock registers its conv and BatchNorm twice: `feature.trunk.i.trunk.0` is
/// `feature.trunk.i.C`, `feature.trunk.i.trunk.1` is `feature.trunk.i.BN`. Maps the duplicate
/// name to ours.
fn canonical_conv_block_name(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() >= 6 && parts[0] == "feature" && parts[1] == "trunk" && parts[3] == "trunk" {
        let sub = match parts[4] {
            "0" => "C",
            "1" => "BN",
            _ => return None,
        };
        let mut v = vec![parts[0], parts[1], parts[2], sub];
        v.extend_from_slice(&parts[5..]);
        return Some(v.join("."));
    }
    None
}

fn short_list(v: &[String]) -> Vec<String> {
    v.iter().take(8).cloned().collect()
}

/// Copies `named` (already renamed to our names) into `vs`.
fn copy_named(
    vs: &nn::VarStore,
    named: Vec<(String, Tensor)>,
    mut skipped: Vec<String>,
    opts: LoadOptions,
    path: &Path,
    scope: Option<&str>,
) -> Result<LoadReport, ModelError> {
    let vars = vs.variables();
    let mut unexpected = Vec::new();
    let mut loaded = BTreeSet::new();
    // Validate everything before touching the store: a failed load leaves the model unchanged.
    let mut plan = Vec::new();
    for (name, t) in named {
        match vars.get(&name) {
            Some(dst) => {
                if dst.size() != t.size() {
                    return Err(ModelError::ShapeMismatch {
                        path: path.to_path_buf(),
                        name,
                        expected: dst.size(),
                        got: t.size(),
                    });
                }
                plan.push((name, dst.shallow_clone(), t));
            }
            None => unexpected.push(name),
        }
    }
    unexpected.sort();
    if !unexpected.is_empty() && !opts.allow_unexpected {
        return Err(ModelError::UnexpectedTensors {
            path: path.to_path_buf(),
            count: unexpected.len(),
            names: short_list(&unexpected),
        });
    }
    for (name, _, _) in &plan {
        loaded.insert(name.clone());
    }
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| scope.is_none_or(|s| k.starts_with(s)) && !loaded.contains(*k))
        .cloned()
        .collect();
    missing.sort();
    if !missing.is_empty() && !opts.allow_missing {
        return Err(ModelError::MissingTensors {
            path: path.to_path_buf(),
            count: missing.len(),
            names: short_list(&missing),
        });
    }
    tch::no_grad(|| -> Result<(), ModelError> {
        for (name, mut dst, src) in plan {
            dst.f_copy_(&src).map_err(|e| ModelError::Copy {
                path: path.to_path_buf(),
                name,
                msg: e.to_string(),
            })?;
        }
        Ok(())
    })?;
    skipped.extend(unexpected);
    Ok(LoadReport {
        loaded: loaded.into_iter().collect(),
        skipped,
        missing,
    })
}

/// Loads an official FS-CT/CTX `state_dict` saved as safetensors with the official names
/// (strict: every model variable must be present with the right shape, no unknown tensors).
///
/// Accepted and normalised: a `param.` prefix (the fixtures; when present, only those keys are
/// read), a `module.` prefix (DataParallel), the ConvBlock duplicates `feature.trunk.i.trunk.{0,1}`,
/// and `num_batches_tracked` (skipped: unused with a fixed BatchNorm momentum).
pub fn load_official(vs: &mut nn::VarStore, path: &Path) -> Result<LoadReport, ModelError> {
    load_official_with(vs, path, LoadOptions::default())
}

/// [`load_official`] with configurable strictness.
pub fn load_official_with(
    vs: &mut nn::VarStore,
    path: &Path,
    opts: LoadOptions,
) -> Result<LoadReport, ModelError> {
    let all = Tensor::read_safetensors(path).map_err(|e| read_err(path, e))?;
    let has_param = all.iter().any(|(n, _)| n.starts_with("param."));
    let mut canonical = BTreeMap::new();
    let mut aliases = Vec::new();
    let mut skipped = Vec::new();
    for (name, t) in all {
        let name = if has_param {
            match name.strip_prefix("param.") {
                Some(n) => n.to_string(),
                None => continue,
            }
        } else {
            name
        };
        let name = name
            .strip_prefix("module.")
            .map(str::to_string)
            .unwrap_or(name);
        if name.ends_with("num_batches_tracked") {
            skipped.push(name);
        } else if let Some(c) = canonical_conv_block_name(&name) {
            aliases.push((name, c, t));
        } else {
            canonical.insert(name, t);
        }
    }
    for (alias, c, t) in aliases {
        match canonical.entry(c) {
            std::collections::btree_map::Entry::Occupied(_) => skipped.push(alias),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(t);
            }
        }
    }
    copy_named(
        vs,
        canonical.into_iter().collect(),
        skipped,
        opts,
        path,
        None,
    )
}

/// Loads torchvision ResNet-18/34 weights (a safetensors file with torchvision names:
/// `conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, …) into a `TvResNet*` backbone
/// (`feature.*`). `fc.*` and `num_batches_tracked` are skipped; a `module.` or `feature.` prefix is
/// accepted. Every backbone variable must be present; the head is not touched.
pub fn load_torchvision(vs: &mut nn::VarStore, path: &Path) -> Result<LoadReport, ModelError> {
    let all = Tensor::read_safetensors(path).map_err(|e| read_err(path, e))?;
    let mut named = Vec::new();
    let mut skipped = Vec::new();
    for (name, t) in all {
        let bare = name.strip_prefix("module.").unwrap_or(&name);
        let bare = bare.strip_prefix("feature.").unwrap_or(bare);
        if bare.starts_with("fc.") || bare.ends_with("num_batches_tracked") {
            skipped.push(name);
        } else {
            named.push((format!("feature.{bare}"), t));
        }
    }
    copy_named(
        vs,
        named,
        skipped,
        LoadOptions::default(),
        path,
        Some("feature."),
    )
}

/// Stops gradient tracking for every backbone variable (`feature.*`), so the optimizer never
/// updates them (tch/libtorch optimizers skip parameters without a gradient). Returns how many
/// tensors were frozen. BatchNorm still follows the `train` flag given to `embed`.
pub fn freeze_backbone(vs: &nn::VarStore) -> usize {
    let mut n = 0;
    for (name, t) in vs.variables() {
        if name.starts_with("feature.") && t.requires_grad() {
            let _ = t.set_requires_grad(false);
            n += 1;
        }
    }
    n
}
