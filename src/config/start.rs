//! Where a fresh training run's weights start. The official ResNets always start from
//! pretrained weights (`--FETI 0`: torchvision's ImageNet weights, `--FETI 1`: the FETI
//! checkpoint) and nothing can be downloaded here, so a ResNet run must say what it starts
//! from: a file, or random weights on purpose. A comparison with the paper is then never
//! silently from scratch.

use std::path::Path;

use super::{ConfigError, Pretrained, Resolved};

/// The initial weights of a fresh run.
#[derive(Debug, Clone, PartialEq)]
pub enum Start<'a> {
    /// A Conv backbone: random, as in the official code.
    Random,
    /// A ResNet from random weights, asked for with `pretrained = "none"`; the line to warn with.
    RandomAsked { warning: String },
    /// A ResNet from a local weights file (`--pretrained FILE`).
    Pretrained(&'a Path),
    /// The whole model from an official FS-CT state_dict (`--official FILE`).
    Official(&'a Path),
}

impl Start<'_> {
    /// For the start-up log and `--dry-run`.
    pub fn describe(&self) -> String {
        match self {
            Start::Random => "random weights".into(),
            Start::RandomAsked { .. } => "random weights (pretrained = \"none\")".into(),
            Start::Pretrained(p) => format!("pretrained weights from {}", p.display()),
            Start::Official(p) => format!("the official state_dict {}", p.display()),
        }
    }
}

impl Start<'_> {
    /// The start's file is there: checked before any work (`--dry-run` does not need it).
    pub fn check_file(&self) -> Result<(), ConfigError> {
        let (key, path, fix) = match self {
            Start::Pretrained(p) => (
                "pretrained",
                p,
                "make it with the one-line conversion in the README (\"Pretrained weights\"), or pass --pretrained none for random weights",
            ),
            Start::Official(p) => (
                "official",
                p,
                "pass an official state_dict saved as safetensors (README, \"Pretrained weights\", shows the conversion)",
            ),
            _ => return Ok(()),
        };
        if path.is_file() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                key,
                message: format!("{} is not a file; {fix}", path.display()),
            })
        }
    }
}

impl Resolved {
    /// The start of a fresh training run, or the refusal of an undecided one (resumed runs
    /// and `test` take their weights from elsewhere and do not ask).
    pub fn start(&self) -> Result<Start<'_>, ConfigError> {
        let m = &self.config.model;
        let b = m.backbone;
        let invalid = |message: String| ConfigError::Invalid {
            key: "pretrained",
            message,
        };
        if !b.is_resnet() {
            if let Some(Pretrained::File(p)) = &m.pretrained {
                return Err(invalid(format!(
                    "{}: --pretrained applies to ResNets only ({b:?} starts from random weights, as in the official code); drop --pretrained",
                    p.display()
                )));
            }
        }
        if let Some(p) = &m.official {
            return Ok(Start::Official(p));
        }
        let Some(official) = b.official_start() else {
            return Ok(Start::Random);
        };
        match &m.pretrained {
            Some(Pretrained::File(p)) => Ok(Start::Pretrained(p)),
            Some(Pretrained::None) => Ok(Start::RandomAsked {
                warning: format!(
                    "{b:?} starts from random weights (pretrained = \"none\"), but the official setting starts from {official}: pass them with --pretrained FILE"
                ),
            }),
            None => Err(invalid(format!(
                "{b:?} starts from {official} in the official setting, and nothing is downloaded: pass them with --pretrained FILE (a safetensors file; the README's \"Pretrained weights\" shows the one-line conversion), or train from random weights with --pretrained none (config: pretrained = \"none\")"
            ))),
        }
    }
}

/// What the run is and starts from, in lines for the start-up log and `--dry-run`.
pub fn summary(r: &Resolved, start: Option<&Start>) -> Vec<String> {
    let mut lines = vec![format!("backbone {}", r.config.model.backbone.describe())];
    lines.push(match start {
        Some(s) => format!("start: {}", s.describe()),
        None => "start: the checkpoint resumed".into(),
    });
    lines
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{Backbone, RunConfig};

    fn start_of(b: Backbone, pretrained: Option<&str>) -> Result<String, String> {
        let mut c = RunConfig::default();
        c.model.backbone = b;
        c.model.pretrained = pretrained.map(|p| Pretrained::from(PathBuf::from(p)));
        let r = c.resolve().unwrap();
        r.start()
            .map(|s| format!("{s:?}"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_resnet_run_says_where_it_starts() {
        let err = start_of(Backbone::ResNet34, None).unwrap_err();
        assert!(
            err.contains("ImageNet weights of resnet34")
                && err.contains("--pretrained FILE")
                && err.contains("--pretrained none"),
            "{err}"
        );
        let err = start_of(Backbone::FetiResNet34, None).unwrap_err();
        assert!(err.contains("FETI checkpoint"), "{err}");
        let ok = start_of(Backbone::ResNet34, Some("none")).unwrap();
        assert!(
            ok.contains("RandomAsked") && ok.contains("--pretrained FILE"),
            "{ok}"
        );
        let ok = start_of(Backbone::TvResNet18, Some("w.safetensors")).unwrap();
        assert!(ok.contains("w.safetensors"), "{ok}");
        assert_eq!(start_of(Backbone::Conv4, None).unwrap(), "Random");
        assert_eq!(start_of(Backbone::Conv4, Some("none")).unwrap(), "Random");
        let err = start_of(Backbone::Conv4, Some("w.safetensors")).unwrap_err();
        assert!(err.contains("applies to ResNets only"), "{err}");
    }

    #[test]
    fn pretrained_none_round_trips_in_toml() {
        let c = RunConfig::from_toml("[model]\npretrained = \"none\"\n").unwrap();
        assert_eq!(c.model.pretrained, Some(Pretrained::None));
        assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
        let c = RunConfig::from_toml("[model]\npretrained = \"w/r34.safetensors\"\n").unwrap();
        assert_eq!(
            c.model.pretrained,
            Some(Pretrained::File("w/r34.safetensors".into()))
        );
    }
}
