//! Loading weights files — our own, official FS-CT state_dicts, torchvision / FETI ResNet
//! weights — through one checked load, and freezing the backbone.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use tch::{nn, Tensor};

use super::error::ShapeDiff;
use super::ModelError;
use crate::config::Backbone;

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Model variables that received a value (our names).
    pub loaded: Vec<String>,
    /// File tensors deliberately not used: `num_batches_tracked`, the ConvBlock duplicates
    /// `feature.trunk.i.trunk.{0,1}.*`, torchvision's `fc.*`, and (FETI checkpoints) blocks this
    /// model does not have.
    pub skipped: Vec<String>,
    /// A line to warn with: the whole blocks a FETI checkpoint lacks or adds, which the official
    /// code's `strict=False` load passes over in silence.
    pub warning: Option<String>,
}

/// What kind of weights file is loaded; it decides how the file's names map onto the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsSource {
    /// A file fsct-dist wrote (`best/last.safetensors`, `--dump-params`, a checkpoint's model):
    /// the model's own names, every variable.
    Run,
    /// An official FS-CT/CTX `state_dict` (`--official`): official names, normalised.
    /// `backbone_loaded`: the backbone already has its weights (`--pretrained`), so a file
    /// without any `feature.*` tensor is accepted: the official `--FETI 0` checkpoints hold
    /// none, because the official torchvision backbone is not an `nn.Module` and never saved.
    Official { backbone_loaded: bool },
    /// Backbone weights (`--pretrained`) for this backbone: torchvision's resnet18/34
    /// `state_dict` (TvResNet*) or the FETI checkpoint's (FetiResNet*).
    Pretrained(Backbone),
}

impl WeightsSource {
    fn fix(self) -> String {
        match self {
            WeightsSource::Run => "it was written for another model: drop the flags that change the model (--method, --backbone/--FETI, --n-way, --k-shot, --image-size, head sizes) or use the run folder that wrote it".into(),
            WeightsSource::Official { .. } => "is it an official state_dict of this model? Check --method, --backbone/--FETI, --n_way, --k_shot, --image-size and the head sizes (heads, dim_head, mlp_dim, dim_attn)".into(),
            WeightsSource::Pretrained(b) => format!(
                "--pretrained takes a ResNet state_dict of {b:?}'s depth and layout: torchvision's resnet18/34 for TvResNet*, the FETI checkpoint for FetiResNet* (README, \"Pretrained weights\")"
            ),
        }
    }
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

/// A file tensor under the model's name for it (or skipped, or an alias).
struct Named {
    file: String,
    model: String,
    tensor: Tensor,
}

/// `feature.layerI.J` of a ResNet variable name (the BasicBlock it belongs to).
fn block_of(model_name: &str) -> Option<&str> {
    let rest = model_name.strip_prefix("feature.layer")?;
    let mut parts = rest.splitn(3, '.');
    let (_, j) = (parts.next()?, parts.next()?);
    j.parse::<u32>().ok()?;
    let len = "feature.layer".len() + rest.find('.')? + 1 + j.len();
    Some(&model_name[..len])
}

/// Blocks per stage, from names (`feature.layer2.3.*` → stage 2 has at least 4 blocks).
fn depths<'a>(names: impl Iterator<Item = &'a str>) -> [u32; 4] {
    let mut d = [0; 4];
    for n in names {
        if let Some(b) = block_of(n) {
            let rest = &b["feature.layer".len()..];
            let (i, j) = rest.split_once('.').unwrap_or(("0", "0"));
            if let (Ok(i @ 1..=4), Ok(j)) = (i.parse::<usize>(), j.parse::<u32>()) {
                d[i - 1] = d[i - 1].max(j + 1);
            }
        }
    }
    d
}

/// A hint from the stem's kernel (5×5 FETI, 7×7 torchvision) or the depths, when they differ.
fn layout_hint(shapes: &[ShapeDiff], file_depths: [u32; 4], model_depths: [u32; 4]) -> String {
    if let Some(d) = shapes.iter().find(|d| d.name == "feature.conv1.weight") {
        match d.file.get(2) {
            Some(5) => return "; the file has the FETI layout's 5×5 stem: use --FETI 1 (backbone FetiResNet*)".into(),
            Some(7) => return "; the file has torchvision's 7×7 stem: use --FETI 0 (backbone TvResNet*)".into(),
            _ => {}
        }
    }
    let name = |d: [u32; 4]| match d {
        [1, 1, 1, 1] => " (ResNet10)",
        [2, 1, 1, 1] => " (ResNet12)",
        [2, 2, 2, 2] => " (ResNet18)",
        [3, 4, 6, 3] => " (ResNet34)",
        _ => "",
    };
    if file_depths != [0; 4] && model_depths != [0; 4] && file_depths != model_depths {
        return format!(
            "; the file's stages have {file_depths:?} blocks{}, the model's {model_depths:?}{}",
            name(file_depths),
            name(model_depths)
        );
    }
    String::new()
}

/// The one checked load: every file tensor must be a model variable of the same shape, and
/// every model variable (of the backbone, for `--pretrained`) must be in the file. Everything
/// is checked before the store is touched, so a refused file leaves the model unchanged, and
/// the refusal names the file, the offending tensors and the fix.
pub fn load_checked(
    vs: &mut nn::VarStore,
    path: &Path,
    source: WeightsSource,
) -> Result<LoadReport, ModelError> {
    let vars = vs.variables();
    if let WeightsSource::Pretrained(backbone) = source {
        if !vars.contains_key("feature.conv1.weight") {
            return Err(ModelError::PretrainedNotResNet {
                path: path.to_path_buf(),
                backbone,
            });
        }
    }
    let hint = match source {
        WeightsSource::Run => "",
        _ => " (a safetensors file is needed: convert a PyTorch .pt/.pth/.tar as the README's \"Pretrained weights\" shows)",
    };
    if !path.is_file() {
        return Err(read_err(path, format!("not a file{hint}")));
    }
    let all = Tensor::read_safetensors(path).map_err(|e| read_err(path, format!("{e}{hint}")))?;
    let (named, mut skipped) = match source {
        WeightsSource::Run => (
            all.into_iter()
                .map(|(n, t)| Named {
                    model: n.clone(),
                    file: n,
                    tensor: t,
                })
                .collect(),
            Vec::new(),
        ),
        WeightsSource::Official { .. } => official_names(all),
        WeightsSource::Pretrained(_) => backbone_names(all),
    };
    let no_backbone = !named.iter().any(|n| n.model.starts_with("feature."));
    // Which model variables the file must hold.
    let needed = |name: &str| match source {
        WeightsSource::Pretrained(_) => name.starts_with("feature."),
        WeightsSource::Official {
            backbone_loaded: true,
        } if no_backbone => !name.starts_with("feature."),
        _ => true,
    };
    let mut extra = Vec::new();
    let mut shapes = Vec::new();
    let mut plan = Vec::new();
    for n in named {
        match vars.get(&n.model) {
            Some(dst) if dst.size() != n.tensor.size() => shapes.push(ShapeDiff {
                name: n.model,
                file: n.tensor.size(),
                model: dst.size(),
            }),
            Some(dst) => plan.push((n.model, dst.shallow_clone(), n.tensor)),
            None => extra.push((n.file, n.model)),
        }
    }
    let present: BTreeSet<&str> = plan
        .iter()
        .map(|(n, _, _)| n.as_str())
        .chain(shapes.iter().map(|d| d.name.as_str()))
        .collect();
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| needed(k) && !present.contains(k.as_str()))
        .cloned()
        .collect();
    missing.sort();
    extra.sort();
    let file_depths = depths(
        present
            .iter()
            .copied()
            .chain(extra.iter().map(|(_, m)| m.as_str())),
    );
    let model_depths = depths(vars.keys().map(String::as_str));
    // The official FETI load is `strict=False`: whole blocks a checkpoint lacks keep their
    // initial weights, blocks it adds are ignored. Accepted here too, but said.
    let mut warning = None;
    if let WeightsSource::Pretrained(b) = source {
        if b.layout() == Some(crate::config::ResNetLayout::Feti) && shapes.is_empty() {
            let file_blocks: BTreeSet<String> = present
                .iter()
                .copied()
                .chain(extra.iter().map(|(_, m)| m.as_str()))
                .filter_map(block_of)
                .map(str::to_string)
                .collect();
            let model_blocks: BTreeSet<String> = vars
                .keys()
                .filter_map(|k| block_of(k))
                .map(str::to_string)
                .collect();
            let lacking: Vec<String> = model_blocks.difference(&file_blocks).cloned().collect();
            let adding: Vec<String> = file_blocks.difference(&model_blocks).cloned().collect();
            let within = |name: &str, blocks: &[String]| {
                block_of(name).is_some_and(|b| blocks.iter().any(|x| x == b))
            };
            let rest_missing = missing.iter().any(|m| !within(m, &lacking));
            let rest_extra = extra.iter().any(|(_, m)| !within(m, &adding));
            let partial = !lacking.is_empty() || !adding.is_empty();
            if partial && !rest_missing && !rest_extra {
                let strip = |v: &[String]| -> String {
                    v.iter()
                        .map(|b| b.trim_start_matches("feature."))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut w = format!(
                    "{} is a FETI checkpoint with stages of {file_depths:?} blocks for a model with {model_depths:?}:",
                    path.display()
                );
                if !lacking.is_empty() {
                    w += &format!(" {} keep their random initial weights", strip(&lacking));
                }
                if !adding.is_empty() {
                    w += &format!(
                        "{} {} are not used",
                        if lacking.is_empty() { "" } else { ";" },
                        strip(&adding)
                    );
                }
                w += " (as in the official code, which loads it with strict=False)";
                warning = Some(w);
                missing.clear();
                skipped.extend(extra.drain(..).map(|(f, _)| f));
            }
        }
    }
    if !(missing.is_empty() && extra.is_empty() && shapes.is_empty()) {
        let mut hint = layout_hint(&shapes, file_depths, model_depths);
        if matches!(source, WeightsSource::Official { .. })
            && no_backbone
            && missing.iter().any(|m| m.starts_with("feature."))
        {
            hint += "; it holds no backbone, as the official --FETI 0 checkpoints (the official code never saved the torchvision ResNet): pass its ImageNet weights with --pretrained FILE too";
        }
        return Err(ModelError::WeightsMismatch {
            path: path.to_path_buf(),
            missing,
            extra: extra.into_iter().map(|(f, _)| f).collect(),
            shapes,
            fix: format!("{}{hint}", source.fix()),
        });
    }
    tch::no_grad(|| -> Result<(), ModelError> {
        for (name, dst, src) in plan.iter_mut() {
            dst.f_copy_(src).map_err(|e| ModelError::Copy {
                path: path.to_path_buf(),
                name: name.clone(),
                msg: e.to_string(),
            })?;
        }
        Ok(())
    })?;
    let mut loaded: Vec<String> = plan.into_iter().map(|(n, _, _)| n).collect();
    loaded.sort();
    Ok(LoadReport {
        loaded,
        skipped,
        warning,
    })
}

/// Official names → ours. Accepted and normalised: a `param.` prefix (the fixtures; when
/// present, only those keys are read), a `module.` prefix (DataParallel), the ConvBlock
/// duplicates `feature.trunk.i.trunk.{0,1}`, and `num_batches_tracked` (skipped: unused with a
/// fixed BatchNorm momentum).
fn official_names(all: Vec<(String, Tensor)>) -> (Vec<Named>, Vec<String>) {
    let has_param = all.iter().any(|(n, _)| n.starts_with("param."));
    let mut canonical: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    let mut aliases = Vec::new();
    let mut skipped = Vec::new();
    for (file, t) in all {
        let name = if has_param {
            match file.strip_prefix("param.") {
                Some(n) => n.to_string(),
                None => continue,
            }
        } else {
            file.clone()
        };
        let name = name
            .strip_prefix("module.")
            .map(str::to_string)
            .unwrap_or(name);
        if name.ends_with("num_batches_tracked") {
            skipped.push(file);
        } else if let Some(c) = canonical_conv_block_name(&name) {
            aliases.push((file, c, t));
        } else {
            canonical.insert(name, (file, t));
        }
    }
    for (file, c, t) in aliases {
        match canonical.entry(c) {
            std::collections::btree_map::Entry::Occupied(_) => skipped.push(file),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((file, t));
            }
        }
    }
    let named = canonical
        .into_iter()
        .map(|(model, (file, tensor))| Named {
            file,
            model,
            tensor,
        })
        .collect();
    (named, skipped)
}

/// torchvision / FETI backbone names → ours (`feature.*`). torchvision's are `conv1.weight`,
/// `bn1.*`, `layer1.0.conv1.weight`, ...; the FETI checkpoint adds `module.resnet.` (stripped,
/// as the official `pretrain_load` does); `module.`, `resnet.` and `feature.` prefixes are
/// accepted too. `fc.*` (the ImageNet classifier) and `num_batches_tracked` are skipped.
fn backbone_names(all: Vec<(String, Tensor)>) -> (Vec<Named>, Vec<String>) {
    let mut named = Vec::new();
    let mut skipped = Vec::new();
    for (file, t) in all {
        let mut bare = file.as_str();
        for prefix in ["module.", "resnet.", "feature."] {
            bare = bare.strip_prefix(prefix).unwrap_or(bare);
        }
        if bare.starts_with("fc.") || bare.ends_with("num_batches_tracked") {
            skipped.push(file);
        } else {
            named.push(Named {
                model: format!("feature.{bare}"),
                file,
                tensor: t,
            });
        }
    }
    (named, skipped)
}

/// Loads an official FS-CT/CTX `state_dict` saved as safetensors with the official names
/// ([`load_checked`] with [`WeightsSource::Official`]).
pub fn load_official(vs: &mut nn::VarStore, path: &Path) -> Result<LoadReport, ModelError> {
    load_checked(
        vs,
        path,
        WeightsSource::Official {
            backbone_loaded: false,
        },
    )
}

/// Gives every 4-D variable (the convolution weights) channels-last strides in place, so that
/// the backbone runs channels-last ([`super::layers::channels_last`]). Loading weights later
/// (`copy_`) keeps the layout; files are written contiguous ([`crate::files::write_tensors`]).
/// Returns how many tensors changed.
pub fn use_channels_last(vs: &nn::VarStore) -> usize {
    let mut n = 0;
    for (_, t) in vs.variables() {
        if t.dim() == 4 {
            let mut v = t.shallow_clone();
            v.set_data(&super::layers::channels_last(&t));
            n += 1;
        }
    }
    n
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
