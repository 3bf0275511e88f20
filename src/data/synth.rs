//! The built-in procedural dataset (`fsct-dist data synth`), in the official JSON format.
//!
//! A class is a composition drawn from its seed: a shape (8 kinds), a texture (6 kinds) and a
//! two-colour palette (hues from six families, so colour alone does not identify a class). Classes take distinct (shape, texture) pairs while there are enough (48),
//! so novel classes are new combinations of primitives seen in base training. Instances vary in
//! position, size, rotation, texture phase and frequency, colour, background (hue, gradient,
//! noise) and an occasional distractor blob, so a novel class is learnable from a few shots but
//! not from a single pixel statistic.
//!
//! Layout: `base.json`, `val.json`, `novel.json` (relative `image_names`),
//! `images/<split>/<class>/<i>.png`, `README.md` and the marker `fsct-synth.json`, written last.
//! The folder is built under a temporary sibling name and renamed into place, so a half-written
//! dataset never appears under the final name. Everything is a function of [`SynthOptions`].

use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use image::{ExtendedColorType, ImageEncoder};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::episode::keyed_rng;
use super::DataError;
use crate::config::Split;

const MARKER: &str = "fsct-synth.json";
const GENERATOR: &str = "fsct-dist synth v1";
const DOMAIN_CLASS: u64 = 0x5359_4e54_4843_4c53; // "SYNTHCLS"
const DOMAIN_INSTANCE: u64 = 0x5359_4e54_4849_4d47; // "SYNTHIMG"

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthOptions {
    /// Classes in the base, val and novel splits.
    pub classes: [usize; 3],
    pub images_per_class: usize,
    /// Side of the square images in pixels.
    pub size: u32,
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            classes: [16, 8, 8],
            images_per_class: 30,
            size: 84,
            seed: 0,
        }
    }
}

/// What was written (or found).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    pub root: PathBuf,
    pub classes: [usize; 3],
    pub images: usize,
}

impl std::fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} images in {}/{}/{} classes (base/val/novel) to {}",
            self.images,
            self.classes[0],
            self.classes[1],
            self.classes[2],
            self.root.display()
        )
    }
}

#[derive(Serialize, Deserialize)]
struct Marker {
    generator: String,
    options: SynthOptions,
    images: usize,
}

const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "ring", "cross", "star", "diamond", "hexagon",
];
const TEXTURES: [&str; 6] = ["solid", "stripes", "checker", "dots", "rings", "gradient"];

#[derive(Clone, Debug)]
struct ClassSpec {
    name: String,
    shape: usize,
    texture: usize,
    hue: f32,
    hue2: f32,
    freq: f32,
}

fn class_specs(opts: &SynthOptions) -> Vec<ClassSpec> {
    let total: usize = opts.classes.iter().sum();
    // Distinct (shape, texture) pairs in a seed-dependent order.
    let mut combos: Vec<(usize, usize)> = (0..SHAPES.len())
        .flat_map(|s| (0..TEXTURES.len()).map(move |t| (s, t)))
        .collect();
    let mut rng = keyed_rng(opts.seed, 0, 0, DOMAIN_CLASS);
    for i in (1..combos.len()).rev() {
        let j = rng.random_range(0..=i);
        combos.swap(i, j);
    }
    (0..total)
        .map(|i| {
            let mut r = keyed_rng(opts.seed, i as u64 + 1, 0, DOMAIN_CLASS);
            let (shape, texture) = combos[i % combos.len()];
            // Hues come from six families, so several classes share a colour and only their
            // shape or texture tells them apart.
            let hue = (r.random_range(0..6) as f32 / 6.0 + r.random_range(-0.04f32..0.04))
                .rem_euclid(1.0);
            let hue2 = (hue + r.random_range(0.25f32..0.75)).fract();
            ClassSpec {
                name: format!("c{i:03}_{}_{}", SHAPES[shape], TEXTURES[texture]),
                shape,
                texture,
                hue,
                hue2,
                freq: r.random_range(2.0f32..4.0),
            }
        })
        .collect()
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// Inside test of the class shape in object coordinates (unit radius).
fn inside(shape: usize, u: f32, v: f32) -> bool {
    let rho = (u * u + v * v).sqrt();
    match shape {
        0 => rho <= 1.0,
        1 => u.abs().max(v.abs()) <= 0.8,
        2 => (0..3).all(|k| {
            let a = PI / 2.0 + PI + k as f32 * 2.0 * PI / 3.0;
            u * a.cos() + v * a.sin() <= 0.5
        }),
        3 => (0.55..=1.0).contains(&rho),
        4 => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
        5 => rho <= 0.45 + 0.55 * (0.5 + 0.5 * (5.0 * v.atan2(u)).cos()).powi(2),
        6 => u.abs() + v.abs() <= 1.0,
        _ => (0..3).all(|k| {
            let a = k as f32 * PI / 3.0;
            (u * a.cos() + v * a.sin()).abs() <= 0.87
        }),
    }
}

/// 0 → first colour, 1 → second colour (fractional for the gradient).
fn texture(kind: usize, u: f32, v: f32, freq: f32, phase: f32) -> f32 {
    match kind {
        0 => 0.0,
        1 => ((freq * PI * u + phase).sin() > 0.0) as u8 as f32,
        2 => {
            let f = freq * 0.7;
            (((u * f + phase).floor() + (v * f).floor()) as i64).rem_euclid(2) as f32
        }
        3 => {
            let f = freq * 0.8;
            let (du, dv) = ((u * f + phase).fract() - 0.5, (v * f).rem_euclid(1.0) - 0.5);
            ((du.abs().powi(2) + dv.powi(2)).sqrt() < 0.3) as u8 as f32
        }
        4 => (((u * u + v * v).sqrt() * freq * PI * 1.5 + phase).sin() > 0.0) as u8 as f32,
        _ => ((u + 1.0) / 2.0).clamp(0.0, 1.0),
    }
}

/// Renders image `image` of class `c` as RGB bytes.
fn render(opts: &SynthOptions, spec: &ClassSpec, c: usize, image: usize) -> Vec<u8> {
    let n = opts.size as usize;
    let nf = n as f32;
    let mut r = keyed_rng(opts.seed, c as u64, image as u64, DOMAIN_INSTANCE);
    let bg = hsv(
        r.random(),
        r.random_range(0.0..0.35),
        r.random_range(0.25..0.9),
    );
    let bg2 = hsv(
        r.random(),
        r.random_range(0.0..0.35),
        r.random_range(0.25..0.9),
    );
    let bg_angle: f32 = r.random_range(0.0..2.0 * PI);
    let noise_amp: f32 = r.random_range(4.0..24.0);
    let radius = nf * r.random_range(0.24f32..0.38);
    let cx = nf * (0.5 + r.random_range(-0.14f32..0.14));
    let cy = nf * (0.5 + r.random_range(-0.14f32..0.14));
    let rot: f32 = r.random_range(0.0..2.0 * PI);
    let phase: f32 = r.random_range(0.0..2.0 * PI);
    let freq = spec.freq * r.random_range(0.85f32..1.15);
    let jitter = |r: &mut rand_chacha::ChaCha8Rng| r.random_range(-0.05f32..0.05);
    let ca = hsv(
        spec.hue + jitter(&mut r),
        r.random_range(0.6..1.0),
        r.random_range(0.7..1.0),
    );
    let cb = hsv(
        spec.hue2 + jitter(&mut r),
        r.random_range(0.5..1.0),
        r.random_range(0.35..0.7),
    );
    let blob = r.random_bool(0.5).then(|| {
        (
            nf * r.random::<f32>(),
            nf * r.random::<f32>(),
            nf * r.random_range(0.05f32..0.1),
            hsv(r.random(), 0.7, 0.8),
        )
    });
    let mut noise_state: u64 = r.random();
    let (cos, sin) = (rot.cos(), rot.sin());
    let (gx, gy) = (bg_angle.cos(), bg_angle.sin());
    let mut out = vec![0u8; n * n * 3];
    for y in 0..n {
        for x in 0..n {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let (dx, dy) = ((px - cx) / radius, (py - cy) / radius);
            let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
            let mut col = if inside(spec.shape, u, v) {
                let t = texture(spec.texture, u, v, freq, phase);
                [0, 1, 2].map(|k| ca[k] * (1.0 - t) + cb[k] * t)
            } else {
                let t = (((px / nf - 0.5) * gx + (py / nf - 0.5) * gy) + 0.5).clamp(0.0, 1.0);
                [0, 1, 2].map(|k| bg[k] * (1.0 - t) + bg2[k] * t)
            };
            if let Some((bx, by, br, bc)) = blob {
                if (px - bx).powi(2) + (py - by).powi(2) <= br * br {
                    col = bc;
                }
            }
            for (k, c) in col.iter().enumerate() {
                // splitmix64 step: cheap per-pixel noise that stays deterministic.
                noise_state = noise_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = noise_state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let e = ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * noise_amp;
                out[(y * n + x) * 3 + k] = (c + e).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

fn synth_err(path: &Path, reason: impl std::fmt::Display) -> DataError {
    DataError::Synth {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn split_of(i: usize) -> Split {
    [Split::Base, Split::Val, Split::Novel][i]
}

/// Writes the dataset into `dir` (which must exist and be empty).
fn write_into(dir: &Path, opts: &SynthOptions) -> Result<usize, DataError> {
    let specs = class_specs(opts);
    // (split, class index, global class index)
    let mut jobs = Vec::new();
    let mut g = 0;
    for (s, &count) in opts.classes.iter().enumerate() {
        let mut names = Vec::new();
        let mut labels = Vec::new();
        let mut images = Vec::new();
        for local in 0..count {
            let spec = &specs[g];
            let rel = format!("images/{}/{}", split_of(s).file_stem(), spec.name);
            std::fs::create_dir_all(dir.join(&rel)).map_err(|e| synth_err(dir, e))?;
            for i in 0..opts.images_per_class {
                let file = format!("{rel}/{i:03}.png");
                images.push(file.clone());
                labels.push(local);
                jobs.push((g, i, dir.join(file)));
            }
            names.push(spec.name.clone());
            g += 1;
        }
        let json = serde_json::json!({
            "label_names": names,
            "image_names": images,
            "image_labels": labels,
        });
        let path = dir.join(format!("{}.json", split_of(s).file_stem()));
        std::fs::write(
            &path,
            serde_json::to_string(&json).expect("json of strings"),
        )
        .map_err(|e| synth_err(&path, e))?;
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len().max(1));
    let size = opts.size;
    let results: Vec<Result<(), DataError>> = crossbeam::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (jobs, specs) = (&jobs, &specs);
                sc.spawn(move |_| -> Result<(), DataError> {
                    for (g, i, path) in jobs.iter().skip(t).step_by(threads) {
                        if crate::signals::stop_requested() {
                            return Err(DataError::SynthStopped { path: dir.into() });
                        }
                        let px = render(opts, &specs[*g], *g, *i);
                        let f = std::fs::File::create(path).map_err(|e| synth_err(path, e))?;
                        image::codecs::png::PngEncoder::new(std::io::BufWriter::new(f))
                            .write_image(&px, size, size, ExtendedColorType::Rgb8)
                            .map_err(|e| synth_err(path, e))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(synth_err(dir, "a writer thread panicked")))
            })
            .collect()
    })
    .map_err(|_| synth_err(dir, "a writer thread panicked"))?;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let readme = format!(
        "# fsct-dist built-in dataset\n\nProcedural images written by `fsct-dist data synth` \
         ({GENERATOR}).\nClasses (base/val/novel): {:?}, {} images per class, {}×{} px, seed {}.\n\
         A class is a shape × texture × colour palette; instances vary in position, size, \
         rotation, colours, background and noise.\nSplit files: base.json, val.json, novel.json \
         (official FS-CT format, relative paths).\n",
        opts.classes, opts.images_per_class, opts.size, opts.size, opts.seed
    );
    std::fs::write(dir.join("README.md"), readme).map_err(|e| synth_err(dir, e))?;
    let marker = Marker {
        generator: GENERATOR.into(),
        options: opts.clone(),
        images: jobs.len(),
    };
    std::fs::write(
        dir.join(MARKER),
        serde_json::to_string_pretty(&marker).expect("marker json"),
    )
    .map_err(|e| synth_err(dir, e))?;
    Ok(jobs.len())
}

fn read_marker(dir: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    serde_json::from_str(&text).ok()
}

fn summary(dir: &Path, opts: &SynthOptions, images: usize) -> SynthSummary {
    SynthSummary {
        root: dir.to_path_buf(),
        classes: opts.classes,
        images,
    }
}

/// Largest image side, images per class and classes per split `data synth` writes: an image
/// of MAX_SIZE² pixels is 3 MiB, and the whole dataset stays far below a disk.
const MAX_SIZE: u32 = 1024;
const MAX_IMAGES_PER_CLASS: usize = 100_000;
const MAX_CLASSES: usize = 10_000;

/// Removes `.NAME.tmp-PID-*` / `.NAME.old-PID-*` folders beside the dataset that a process
/// killed mid-generation left behind (its PID no longer runs). A live process's are kept: it
/// may be another rank or user writing the same dataset right now.
fn remove_stale_temps(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = [".tmp-", ".old-"]
            .iter()
            .find_map(|k| file.strip_prefix(&format!(".{name}{k}")))
        else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_none_or(|p| Path::new("/proc").join(p.to_string()).exists());
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            tracing::info!(
                "removed {}, left by an interrupted dataset generation",
                e.path().display()
            );
        }
    }
}

/// Writes the dataset to `out`, replacing an earlier built-in dataset there. Refuses to touch a
/// folder that is neither empty nor a built-in dataset.
pub fn write_dataset(out: &Path, opts: &SynthOptions) -> Result<SynthSummary, DataError> {
    if !(16..=MAX_SIZE).contains(&opts.size)
        || !(1..=MAX_IMAGES_PER_CLASS).contains(&opts.images_per_class)
        || opts
            .classes
            .iter()
            .any(|&c| !(1..=MAX_CLASSES).contains(&c))
    {
        return Err(DataError::BadRequest(format!(
            "synth needs --size from 16 to {MAX_SIZE} (got {}), 1 to {MAX_IMAGES_PER_CLASS} \
             images per class (got {}) and 1 to {MAX_CLASSES} classes per split (got {:?})",
            opts.size, opts.images_per_class, opts.classes
        )));
    }
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && read_marker(out).is_none() {
            return Err(synth_err(
                out,
                "the folder exists and is not a built-in dataset; choose another --out or \
                 remove it",
            ));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| synth_err(&parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synthetic".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    remove_stale_temps(&parent, &name);
    let tmp = parent.join(format!(".{name}.tmp-{}-{nonce}", std::process::id()));
    // A stop signal (SIGTERM, SIGUSR1, Ctrl-C) ends the writers at the next image; the error
    // path below removes the temporary folder, so nothing half-written stays behind.
    let _catch = crate::signals::Catch::new().map_err(|e| synth_err(&tmp, format!("{e:#}")))?;
    std::fs::create_dir(&tmp).map_err(|e| synth_err(&tmp, e))?;
    let images = match write_into(&tmp, opts) {
        Ok(n) => n,
        Err(DataError::SynthStopped { .. }) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(DataError::SynthStopped { path: out.into() });
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // Move an old dataset aside first so the final name only ever holds a complete one.
    let old = parent.join(format!(".{name}.old-{}-{nonce}", std::process::id()));
    if out.exists() && std::fs::rename(out, &old).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(synth_err(out, "cannot move the old dataset aside"));
    }
    let renamed = std::fs::rename(&tmp, out);
    let _ = std::fs::remove_dir_all(&old);
    if let Err(e) = renamed {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process (e.g. another rank) may have finished the same dataset first.
        if read_marker(out).is_some_and(|m| &m.options == opts) {
            return Ok(summary(out, opts, images));
        }
        return Err(synth_err(out, e));
    }
    Ok(summary(out, opts, images))
}

/// Returns `dir` if it holds the built-in dataset for `opts`; otherwise writes it first.
pub fn ensure_builtin(dir: &Path, opts: &SynthOptions) -> Result<PathBuf, DataError> {
    let complete = read_marker(dir).is_some_and(|m| {
        m.generator == GENERATOR
            && &m.options == opts
            && ["base", "val", "novel"]
                .iter()
                .all(|s| dir.join(format!("{s}.json")).is_file())
    });
    if !complete {
        write_dataset(dir, opts)?;
    }
    Ok(dir.to_path_buf())
}
