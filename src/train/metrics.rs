//! metrics.jsonl: one JSON object per line, appended as the run goes. A run killed after its
//! last checkpoint and resumed redoes the steps since that checkpoint, so on resume the log is
//! first cut back to what the checkpoint had seen: every line then describes the run once.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::checkpoint::CheckpointState;
use crate::config::Split;
use crate::files::write_atomic;

/// One metrics line.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Metric {
    Train {
        epoch: u64,
        step: u64,
        loss: f64,
        acc: f64,
        episodes_per_s: f64,
    },
    Val {
        epoch: u64,
        acc: f64,
        ci95: f64,
        best: bool,
    },
    Test {
        split: Split,
        episodes: usize,
        acc: f64,
        ci95: f64,
    },
}

/// Whether a logged line happened before the checkpoint `at` was written.
fn seen_by(line: &serde_json::Value, at: &CheckpointState) -> bool {
    match line["kind"].as_str() {
        Some("train") => line["step"].as_u64().is_some_and(|s| s <= at.step),
        Some("val") => line["epoch"]
            .as_u64()
            .is_some_and(|e| e < at.epoch || (e == at.epoch && at.epoch_validated)),
        // The test runs again at the end of the resumed run; lines we cannot read are kept.
        Some("test") => false,
        _ => true,
    }
}

/// Rewrites `path` (atomically) without the lines logged after checkpoint `at`; returns how
/// many were dropped. A missing log is fine (nothing to cut).
pub(super) fn rewind(path: &Path, at: &CheckpointState) -> Result<usize> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(0);
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let keep =
            serde_json::from_str::<serde_json::Value>(line).map_or(true, |v| seen_by(&v, at));
        if keep {
            kept.push_str(line);
            kept.push('\n');
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        write_atomic(path, kept.as_bytes())
            .with_context(|| format!("cutting {} back to the checkpoint", path.display()))?;
    }
    Ok(dropped)
}
