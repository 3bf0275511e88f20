//! `fsct-dist data check DIR`: open all three splits, decode every image, report what is wrong.
//! It applies exactly the checks that loading applies (the same split reader, the same
//! decoder with the same limits for the given image size), so "no problems" means a run will
//! not fail on a file.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{decode_image_for, open_split, DataError, DatasetFormat};
use crate::config::Split;

/// The findings for one split.
#[derive(Clone, Debug)]
pub struct SplitReport {
    pub split: Split,
    /// None when the split could not be opened (see `problems`).
    pub format: Option<DatasetFormat>,
    pub classes: usize,
    pub images: usize,
    pub min_per_class: usize,
    pub max_per_class: usize,
    /// One line per problem: missing split, unreadable or corrupt image, empty class.
    pub problems: Vec<String>,
}

/// The findings for a dataset folder.
#[derive(Clone, Debug)]
pub struct CheckReport {
    pub root: PathBuf,
    pub splits: Vec<SplitReport>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.splits.iter().all(|s| s.problems.is_empty())
    }
    pub fn num_problems(&self) -> usize {
        self.splits.iter().map(|s| s.problems.len()).sum()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset {}", self.root.display())?;
        writeln!(
            f,
            "{:<6} {:<18} {:>7} {:>8} {:>15}",
            "split", "format", "classes", "images", "per class"
        )?;
        for s in &self.splits {
            let format = s
                .format
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "{:<6} {:<18} {:>7} {:>8} {:>15}",
                s.split.file_stem(),
                format,
                s.classes,
                s.images,
                format!("{}–{}", s.min_per_class, s.max_per_class)
            )?;
        }
        if self.is_ok() {
            writeln!(f, "no problems found")
        } else {
            writeln!(f, "{} problem(s):", self.num_problems())?;
            for s in &self.splits {
                for p in &s.problems {
                    writeln!(f, "  [{}] {p}", s.split.file_stem())?;
                }
            }
            Ok(())
        }
    }
}

/// The image size `data check` assumes when none is given: the largest official one (the
/// resize limit is strictest there).
pub const CHECK_IMAGE_SIZE: u32 = 224;

/// Checks every split of `root` for images resized to `image_size` px; only a missing root
/// folder is an `Err`, everything else is a problem in the report. Images are decoded on all
/// available cores.
pub fn check_dataset(root: &Path, image_size: u32) -> Result<CheckReport, DataError> {
    if !root.is_dir() {
        return Err(DataError::MissingRoot {
            path: root.to_path_buf(),
        });
    }
    let mut splits = Vec::new();
    for split in [Split::Base, Split::Val, Split::Novel] {
        let mut rep = SplitReport {
            split,
            format: None,
            classes: 0,
            images: 0,
            min_per_class: 0,
            max_per_class: 0,
            problems: Vec::new(),
        };
        match open_split(root, split) {
            Err(e) => rep.problems.push(e.to_string()),
            Ok(index) => {
                rep.format = Some(index.format);
                rep.classes = index.classes.len();
                rep.images = index.num_images();
                let counts = index.classes.iter().map(|c| c.images.len());
                rep.min_per_class = counts.clone().min().unwrap_or(0);
                rep.max_per_class = counts.max().unwrap_or(0);
                for c in index.classes.iter().filter(|c| c.images.is_empty()) {
                    rep.problems
                        .push(format!("class {:?} has no images", c.name));
                }
                let files: Vec<&Path> = index
                    .classes
                    .iter()
                    .flat_map(|c| c.images.iter().map(PathBuf::as_path))
                    .collect();
                rep.problems.extend(decode_all(&files, root, image_size));
            }
        }
        splits.push(rep);
    }
    Ok(CheckReport {
        root: root.to_path_buf(),
        splits,
    })
}

/// Decodes all files in parallel; returns one message per failure, in file order.
fn decode_all(files: &[&Path], root: &Path, image_size: u32) -> Vec<String> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, files.len().max(1));
    let mut found: Vec<(usize, String)> = crossbeam::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move |_| {
                    let mut bad = Vec::new();
                    for (i, f) in files.iter().enumerate().skip(t).step_by(threads) {
                        if let Err(e) = decode_image_for(f, root, Some(image_size)) {
                            let msg = match e {
                                DataError::BadImage { path, reason, .. } => {
                                    format!("{}: {reason}", path.display())
                                }
                                other => other.to_string(),
                            };
                            bad.push((i, msg));
                        }
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![(usize::MAX, "a checker thread panicked".into())])
            })
            .collect()
    })
    .unwrap_or_else(|_| vec![(usize::MAX, "a checker thread panicked".into())]);
    found.sort();
    found.into_iter().map(|(_, m)| m).collect()
}
