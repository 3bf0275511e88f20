//! Files written whole or not at all (temp file, fsync, rename), so a crash or a full disk never
//! leaves a half-written file that a later run would trust; JSON lines, weights, dates for
//! result files. Used by every layer that writes (train, memory, bench).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use tch::nn::VarStore;
use tch::Tensor;

/// The temp name used while `path` is being written: same folder (so rename is atomic), and the
/// same extension (VarStore picks the format from it).
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".tmp-{}-{name}", std::process::id()))
}

/// Runs `write` on a temp path, makes it durable, then renames it over `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let hint = disk_hint_for(&result);
    result.with_context(|| format!("writing {}{hint}", path.display()))
}

/// " (the disk is full …)" when an error says the disk or a file-size limit is exhausted, so
/// the message names the fix; empty otherwise.
pub fn disk_hint_for<T>(result: &Result<T>) -> &'static str {
    match result {
        Err(e) if is_disk_full(e) => {
            " (the disk is full, or a file-size limit was hit: free space, then resume with --resume)"
        }
        _ => "",
    }
}

fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == 28 || code == 27) // ENOSPC, EFBIG
            || {
                let t = c.to_string();
                t.contains("No space left") || t.contains("File too large")
            }
    })
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        fs::write(tmp, bytes)?;
        Ok(())
    })
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Saves every variable (parameters and BatchNorm buffers) as safetensors, loadable from Python.
pub fn save_weights(vs: &VarStore, path: &Path) -> Result<()> {
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    write_atomic_with(path, |tmp| write_tensors(&named, tmp))
}

/// Writes named tensors as safetensors, each in the contiguous (row-major) layout the format
/// stores: channels-last weights (`--channels-last`) are copied to it, others written as they are.
pub fn write_tensors(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    let contiguous: Vec<(&str, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.as_str(), t.contiguous()))
        .collect();
    Ok(Tensor::write_safetensors(&contiguous, path)?)
}

/// Creates the run folder and checks it is writable before any work is done.
pub fn prepare_output(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the output folder {}; choose another with --output",
            dir.display()
        )
    })?;
    // This process's own name: the ranks of `test` all probe the same folder at once, and a
    // shared name let one rank remove the file another was about to remove.
    let probe = temp_sibling(&dir.join(".write-test"));
    fs::write(&probe, b"ok").with_context(|| {
        format!(
            "the output folder {} is not writable; choose another with --output",
            dir.display()
        )
    })?;
    fs::remove_file(probe)?;
    Ok(())
}

/// Today's UTC date as YYYY-MM-DD (for result files), from the system clock.
pub fn today() -> String {
    let (y, m, d, _) = civil_now();
    format!("{y:04}-{m:02}-{d:02}")
}

/// The UTC date and time as YYYYMMDD-HHMMSS (for names of folders moved aside).
pub fn today_and_time() -> String {
    let (y, m, d, secs) = civil_now();
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// (year, month, day, seconds since the epoch) of the system clock, in UTC.
fn civil_now() -> (i64, i64, i64, u64) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, secs)
}

/// Append-only JSON-lines log (metrics). Each line is flushed whole, so a reader never sees half
/// a record.
pub struct JsonLines {
    file: File,
}

impl JsonLines {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { file })
    }

    /// Continues an existing log (a resumed run).
    pub fn append(path: &Path) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, value: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_and_failed_write_leaves_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let err = write_atomic_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"second", "old file intact");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp file left: {leftovers:?}");
    }
}
