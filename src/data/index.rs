//! Datasets on disk: the three supported formats, detected per split, read into a [`SplitIndex`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::DataError;
use crate::config::Split;

/// One class of a split: its name and its image files, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassImages {
    pub name: String,
    pub images: Vec<PathBuf>,
}

/// How a dataset folder stores its splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DatasetFormat {
    /// The official file lists `base.json`, `val.json`, `novel.json`
    /// (`label_names`, `image_names`, `image_labels`).
    JsonLists,
    /// Ravi–Larochelle `train.csv` / `val.csv` / `test.csv` (`filename,label`) and an image folder
    /// (`images/<filename>` or `<label>/<filename>`).
    MiniImagenetCsv,
    /// `<split>/<class>/*.{jpg,jpeg,png}` with the split folder named base|train, val|validation,
    /// novel|test.
    Folders,
}

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatasetFormat::JsonLists => "json file lists",
            DatasetFormat::MiniImagenetCsv => "mini-ImageNet csv",
            DatasetFormat::Folders => "class folders",
        })
    }
}

/// All classes of one split, sorted deterministically (JSON: by label; CSV and folders: by name).
#[derive(Debug, Clone)]
pub struct SplitIndex {
    pub root: PathBuf,
    pub split: Split,
    pub format: DatasetFormat,
    pub classes: Vec<ClassImages>,
}

impl SplitIndex {
    pub fn num_images(&self) -> usize {
        self.classes.iter().map(|c| c.images.len()).sum()
    }
}

fn csv_name(split: Split) -> &'static str {
    match split {
        Split::Base => "train.csv",
        Split::Val => "val.csv",
        Split::Novel => "test.csv",
    }
}

fn folder_names(split: Split) -> [&'static str; 2] {
    match split {
        Split::Base => ["base", "train"],
        Split::Val => ["val", "validation"],
        Split::Novel => ["novel", "test"],
    }
}

/// Opens one split of the dataset in `root`, detecting the format: `<split>.json` first, then the
/// mini-ImageNet csv file, then a split folder. Image files are not opened here (see
/// [`crate::data::check::check_dataset`] for that).
pub fn open_split(root: &Path, split: Split) -> Result<SplitIndex, DataError> {
    if !root.is_dir() {
        return Err(DataError::MissingRoot {
            path: root.to_path_buf(),
        });
    }
    let json = root.join(format!("{}.json", split.file_stem()));
    let csv = root.join(csv_name(split));
    let (format, classes) = if json.is_file() {
        (DatasetFormat::JsonLists, read_json(&json)?)
    } else if csv.is_file() {
        (DatasetFormat::MiniImagenetCsv, read_csv(root, &csv)?)
    } else if let Some(dir) = folder_names(split)
        .iter()
        .map(|n| root.join(n))
        .find(|d| d.is_dir())
    {
        (DatasetFormat::Folders, read_folders(&dir)?)
    } else {
        let [a, b] = folder_names(split);
        return Err(DataError::MissingSplit {
            root: root.to_path_buf(),
            split: split.file_stem(),
            tried: format!(
                "{}.json, {}, {a}/ and {b}/",
                split.file_stem(),
                csv_name(split)
            ),
        });
    };
    let index = SplitIndex {
        root: root.to_path_buf(),
        split,
        format,
        classes,
    };
    if index.num_images() == 0 {
        return Err(DataError::EmptySplit {
            root: root.to_path_buf(),
            split: split.file_stem(),
        });
    }
    check_no_duplicates(&index)?;
    Ok(index)
}

/// Refuses a split that lists one image file twice: in one class, support and query could be
/// the same picture (an inflated accuracy); in two classes, one picture would carry two labels.
fn check_no_duplicates(index: &SplitIndex) -> Result<(), DataError> {
    let mut first_seen: HashMap<PathBuf, &str> = HashMap::new();
    let mut found = Vec::new();
    for class in &index.classes {
        for image in &class.images {
            // `a/./b.jpg` and `a/b.jpg` are one file.
            let key: PathBuf = image.components().collect();
            if let Some(other) = first_seen.insert(key, &class.name) {
                found.push(if other == class.name {
                    format!("{} (twice in class {:?})", image.display(), class.name)
                } else {
                    format!(
                        "{} (in classes {other:?} and {:?})",
                        image.display(),
                        class.name
                    )
                });
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let count = found.len();
    found.truncate(3);
    Err(DataError::DuplicateImages {
        root: index.root.clone(),
        split: index.split.file_stem(),
        count,
        examples: found.join(", "),
    })
}

#[derive(Deserialize)]
struct JsonLists {
    label_names: Vec<serde_json::Value>,
    image_names: Vec<String>,
    image_labels: Vec<i64>,
}

/// The text of a split file, without the byte-order mark that spreadsheet programs put in front.
fn read_text(path: &Path) -> Result<String, DataError> {
    let text = crate::regular_file::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

fn read_json(path: &Path) -> Result<Vec<ClassImages>, DataError> {
    let text = read_text(path)?;
    let bad = |reason: String| DataError::BadSplitFile {
        path: path.to_path_buf(),
        reason,
    };
    let lists: JsonLists = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "{e} (expected an object with label_names: list, image_names: list of strings, \
             image_labels: list of integers)"
        ))
    })?;
    if lists.image_names.len() != lists.image_labels.len() {
        return Err(bad(format!(
            "image_names has {} entries but image_labels has {}; they must match one to one",
            lists.image_names.len(),
            lists.image_labels.len()
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    // Labels need only be unique per class within a file (CIFAR novel labels start at 80); a label
    // indexes label_names when it can, else the class is named after the number.
    let mut by_label: BTreeMap<i64, Vec<PathBuf>> = BTreeMap::new();
    for (name, &label) in lists.image_names.iter().zip(&lists.image_labels) {
        let p = Path::new(name);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        };
        by_label.entry(label).or_default().push(p);
    }
    Ok(by_label
        .into_iter()
        .map(|(label, images)| {
            let name = usize::try_from(label)
                .ok()
                .and_then(|i| lists.label_names.get(i))
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| format!("label {label}"));
            ClassImages { name, images }
        })
        .collect())
}

fn read_csv(root: &Path, path: &Path) -> Result<Vec<ClassImages>, DataError> {
    let text = read_text(path)?;
    let bad = |reason: String| DataError::BadSplitFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        Some((_, h)) if h.trim().eq_ignore_ascii_case("filename,label") => {}
        other => {
            return Err(bad(format!(
                "the first line must be the header `filename,label`, found {:?}",
                other.map(|(_, l)| l).unwrap_or("")
            )))
        }
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        let mut parts = line.trim().split(',');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(f), Some(l), None) if !f.is_empty() && !l.is_empty() => {
                rows.push((f.trim().to_string(), l.trim().to_string()))
            }
            _ => {
                return Err(bad(format!(
                    "line {} is {line:?}; expected `filename,label`",
                    i + 1
                )))
            }
        }
    }
    // Which image layout: decided on the first row, then used for all rows.
    let layouts: [fn(&Path, &str, &str) -> PathBuf; 4] = [
        |r, f, _| r.join("images").join(f),
        |r, f, l| r.join(l).join(f),
        |r, f, l| r.join("images").join(l).join(f),
        |r, f, l| r.join("Dataset").join(l).join(f),
    ];
    let layout = match rows.first() {
        None => layouts[0],
        Some((f, l)) => *layouts
            .iter()
            .find(|lay| lay(root, f, l).is_file())
            .ok_or_else(|| DataError::BadImage {
                path: layouts[0](root, f, l),
                root: root.to_path_buf(),
                reason: format!(
                    "listed in {path:?} but found neither as images/{f} nor as {l}/{f} \
                     (nor images/{l}/{f}, Dataset/{l}/{f}) under the dataset folder"
                ),
            })?,
    };
    let mut by_label: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (f, l) in &rows {
        by_label
            .entry(l.clone())
            .or_default()
            .push(layout(root, f, l));
    }
    Ok(by_label
        .into_iter()
        .map(|(name, images)| ClassImages { name, images })
        .collect())
}

/// True for the file extensions the folder format picks up.
pub(crate) fn is_image_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn read_folders(dir: &Path) -> Result<Vec<ClassImages>, DataError> {
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let mut images = Vec::new();
        for f in std::fs::read_dir(&path).map_err(|e| DataError::io(&path, e))? {
            let f = f.map_err(|e| DataError::io(&path, e))?.path();
            if f.is_file() && is_image_file(&f) {
                images.push(f);
            }
        }
        images.sort();
        classes.push(ClassImages {
            name: entry.file_name().to_string_lossy().into_owned(),
            images,
        });
    }
    classes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(classes)
}
