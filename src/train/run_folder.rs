//! Who may write into a run folder. A fresh run only starts in an empty (or new) folder, so it
//! can never overwrite or mix with another run's files; `--overwrite` moves the old folder aside
//! whole (nothing is deleted). Every process that writes into a run folder (train, resume, test)
//! holds an exclusive lock on `RUN/.lock` for as long as it runs; the kernel releases it when
//! the process ends, however it ends, so a crashed run never leaves a stale lock behind.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::files::today_and_time;

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run folder, held until dropped (or the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Locks `dir` (created if missing) for this process, or says who holds it.
pub fn lock(dir: &Path) -> Result<RunLock> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the output folder {}; choose another with --output",
            dir.display()
        )
    })?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| {
            format!(
                "the output folder {} is not writable; choose another with --output",
                dir.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another fsct-dist process".to_owned()
            } else {
                format!("another fsct-dist process ({holder})")
            };
            bail!(
                "{} is in use by {who}; wait for it to finish, or choose another --output",
                dir.display()
            );
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    // Who holds it, for the message another process prints (informational only: the lock is
    // the flock, not this text).
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = writeln!(file, "pid {}", std::process::id());
    let _ = file.flush();
    Ok(RunLock { _file: file })
}

/// Entries of `dir` worth keeping (none when it does not exist): everything but the lock file
/// and what a run that failed before its first step leaves (its config.toml and an empty
/// metrics.jsonl), so fixing a bad setting and running again needs no --overwrite.
fn contents(dir: &Path) -> Vec<PathBuf> {
    let leftover = |e: &fs::DirEntry| {
        let name = e.file_name();
        name == LOCK_FILE
            || name == super::CONFIG_FILE
            || (name == super::METRICS_FILE && e.metadata().is_ok_and(|m| m.len() == 0))
    };
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !leftover(e))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `dir` holds files written by fsct-dist (a run, finished or not).
fn is_run(dir: &Path) -> bool {
    ["config.toml", "checkpoints", "metrics.jsonl", "state.json"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Whether a fresh run may start in `dir` (missing, empty, or `overwrite`): the check of
/// [`claim_fresh`], without taking the lock or moving anything (`--dry-run` makes it too).
pub fn check_fresh(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "the output {} is a file, not a folder; choose another --output",
            dir.display()
        );
    }
    let found = contents(dir);
    if found.is_empty() || overwrite {
        return Ok(());
    }
    let what = if is_run(dir) {
        "holds another training run"
    } else {
        "is not empty and is not an fsct-dist run folder"
    };
    let resume = if dir.join(super::checkpoint::DIR).is_dir() {
        format!(" continue that run with `--resume {}`, or", dir.display())
    } else {
        String::new()
    };
    bail!(
        "the output folder {} {what} ({} entries, e.g. {});{resume} start over with \
         --overwrite (the old folder is moved aside, nothing is deleted), or choose another \
         --output",
        dir.display(),
        found.len(),
        found[0]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
}

/// Claims `dir` for a fresh run: it must be missing or empty, unless `overwrite` moves what is
/// there aside (to `DIR.old-DATE-TIME`) first. Returns the lock, held for the run.
pub fn claim_fresh(dir: &Path, overwrite: bool) -> Result<RunLock> {
    check_fresh(dir, true)?; // not a file (the lock needs a folder)
    let lock_here = lock(dir)?;
    // The contents are judged under the lock: no other run can be writing there now.
    check_fresh(dir, overwrite)?;
    if contents(dir).is_empty() {
        return Ok(lock_here);
    }
    let aside = aside_name(dir);
    // The old folder moves whole, our lock with it (no other process can be writing there: we
    // hold its lock); then the fresh folder gets a lock of its own.
    fs::rename(dir, &aside).with_context(|| {
        format!(
            "--overwrite: cannot move {} aside to {}",
            dir.display(),
            aside.display()
        )
    })?;
    drop(lock_here);
    tracing::warn!(
        "--overwrite: the old contents of {} were moved to {}",
        dir.display(),
        aside.display()
    );
    lock(dir)
}

/// `DIR.old-YYYYMMDD-HHMMSS` beside `dir`, with a counter if that exists too.
fn aside_name(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let stamp = today_and_time();
    let mut candidate = dir.with_file_name(format!("{name}.old-{stamp}"));
    let mut n = 1;
    while candidate.exists() {
        n += 1;
        candidate = dir.with_file_name(format!("{name}.old-{stamp}-{n}"));
    }
    candidate
}

/// Removes temp files and folders (`.tmp-*`) that an earlier process left in the run folder and
/// its checkpoints when it was killed mid-write. Only call it holding the run's lock: then no
/// other process can be writing them.
pub fn remove_stale_temps(run: &Path) {
    let pid = std::process::id();
    let ours =
        |name: &str| name.contains(&format!("-{pid}-")) || name.ends_with(&format!("-{pid}"));
    for dir in [run.to_path_buf(), run.join(super::checkpoint::DIR)] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(".tmp-") || ours(&name) {
                continue;
            }
            let path = e.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if removed.is_ok() {
                tracing::info!("removed {}, left by an interrupted write", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = lock(&run).unwrap();
        let err = format!("{:#}", lock(&run).unwrap_err());
        assert!(err.contains("in use by another fsct-dist process"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        lock(&run).unwrap();
    }

    #[test]
    fn a_fresh_claim_refuses_a_full_folder_and_overwrite_moves_it_aside_whole() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        drop(claim_fresh(&run, false).unwrap());
        drop(claim_fresh(&run, false).unwrap()); // empty (only the lock file): fine
        fs::write(run.join("config.toml"), b"old").unwrap();
        drop(claim_fresh(&run, false).unwrap()); // a run that never stepped: reusable
        fs::write(run.join("metrics.jsonl"), b"{}\n").unwrap();
        let err = format!("{:#}", claim_fresh(&run, false).unwrap_err());
        assert!(err.contains("holds another training run"), "{err}");
        assert!(err.contains("--overwrite"), "{err}");
        let _lock = claim_fresh(&run, true).unwrap();
        assert!(contents(&run).is_empty());
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("run.old-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            fs::read(aside[0].path().join("config.toml")).unwrap(),
            b"old"
        );
        assert!(aside[0].path().join("metrics.jsonl").is_file());
    }
}
