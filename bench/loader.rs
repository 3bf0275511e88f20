//! Loader throughput: our episode loader vs a PIL + NumPy pipeline of the official kind, on the
//! same 500×375 JPEG files, to 84 and 224 px, with 1 and 2 workers, no augmentation.
//!
//! Run: `cargo bench --bench loader` (set FSCT_BENCH_QUICK=1 for a short smoke run). Python is
//! `.venv/bin/python` (override with FSCT_PYTHON); Pillow and NumPy are pip-installed into it if
//! missing. Prints a markdown table and writes it to bench/results/loader_<date>.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use fsct_dist::config::Split;
use fsct_dist::data::{
    open_split, sample_episode, EpisodeLoader, EpisodeShape, LoaderConfig, TransformConfig,
};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use rand::{Rng, SeedableRng};

const CLASSES: usize = 20;
const PER_CLASS: usize = 20;
const SHAPE: EpisodeShape = EpisodeShape {
    n_way: 5,
    k_shot: 5,
    n_query: 15,
};
const SEED: u64 = 1;

/// Deterministic photo-like content: smooth colour fields, a few edges and sensor noise, so the
/// JPEGs have a realistic size (about 40–60 KB at quality 90).
fn write_jpegs(root: &Path) {
    let (w, h) = (500usize, 375usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    for c in 0..CLASSES {
        let dir = root.join(format!("train/class{c:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..PER_CLASS {
            let (f1, f2, f3): (f32, f32, f32) = (
                rng.random_range(0.005..0.05),
                rng.random_range(0.005..0.05),
                rng.random_range(0.02..0.2),
            );
            let base: [f32; 3] = [rng.random(), rng.random(), rng.random()];
            let mut px = vec![0u8; w * h * 3];
            for y in 0..h {
                for x in 0..w {
                    let (xf, yf) = (x as f32, y as f32);
                    let edge = if (xf * 0.7 + yf * 0.3) % 160.0 < 80.0 {
                        30.0
                    } else {
                        -30.0
                    };
                    for k in 0..3 {
                        let v = 128.0
                            + 60.0 * (xf * f1 + k as f32 + base[k] * 6.0).sin()
                            + 40.0 * (yf * f2 - k as f32).cos()
                            + 15.0 * (xf * f3).sin() * (yf * f3).cos()
                            + edge
                            + rng.random_range(-12.0f32..12.0);
                        px[(y * w + x) * 3 + k] = v.clamp(0.0, 255.0) as u8;
                    }
                }
            }
            let f = std::fs::File::create(dir.join(format!("{i:03}.jpg"))).unwrap();
            JpegEncoder::new_with_quality(std::io::BufWriter::new(f), 90)
                .encode(&px, w as u32, h as u32, ExtendedColorType::Rgb8)
                .unwrap();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn python() -> Option<PathBuf> {
    let py = std::env::var_os("FSCT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import PIL, numpy"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(&py) {
        return Some(py);
    }
    eprintln!("installing pillow and numpy into {}", py.display());
    let _ = Command::new(&py)
        .args(["-m", "pip", "install", "-q", "pillow", "numpy"])
        .status();
    ok(&py).then_some(py)
}

/// One run of the PIL pipeline (`bench/loader_pil.py`, one repeat): images/s; fills `versions`.
fn pil_rate(
    py: &Path,
    script: &Path,
    list_file: &Path,
    size: u32,
    workers: usize,
    versions: &mut String,
) -> Option<f64> {
    let out = Command::new(py)
        .arg(script)
        .arg(list_file)
        .args([size, workers as u32, SHAPE.total() as u32, 1].map(|v| v.to_string()))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    *versions = format!(
        "Python {}, Pillow {}, NumPy {}",
        v["python"].as_str()?,
        v["pillow"].as_str()?,
        v["numpy"].as_str()?
    );
    v["images_per_s"].as_array()?.first()?.as_f64()
}

fn main() {
    let quick = std::env::var_os("FSCT_BENCH_QUICK").is_some();
    let (episodes, repeats) = if quick { (2u64, 1usize) } else { (6, 3) };
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("writing {} JPEGs (500×375)...", CLASSES * PER_CLASS);
    write_jpegs(tmp.path());
    let split = Arc::new(open_split(tmp.path(), Split::Base).unwrap());
    // The same image sequence for both pipelines: the episodes our loader draws.
    let list: Vec<String> = (0..episodes)
        .flat_map(|e| {
            let ep = sample_episode(&split, SHAPE, SEED, 0, e).unwrap();
            ep.flat()
                .into_iter()
                .map(|(c, i)| split.classes[c].images[i].display().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let list_file = tmp.path().join("list.txt");
    std::fs::write(&list_file, list.join("\n")).unwrap();
    let n_images = list.len() as f64;
    let py = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/loader_pil.py");
    let mut versions = String::new();

    // Where the time goes (one thread, warm page cache): per-image ms for each stage, median of
    // `repeats` passes over 100 files; the same stages of the PIL pipeline, timed by the script.
    let stage_list = tmp.path().join("stages.txt");
    std::fs::write(&stage_list, list[..100].join("\n")).unwrap();
    let per_image = |f: &mut dyn FnMut()| {
        f(); // warm-up
        let mut v: Vec<f64> = (0..repeats)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64() * 1e3 / 100.0
            })
            .collect();
        median(&mut v)
    };
    let read_ms = per_image(&mut || {
        for p in &list[..100] {
            std::hint::black_box(std::fs::read(p).unwrap());
        }
    });
    let decode_ms = per_image(&mut || {
        for p in &list[..100] {
            std::hint::black_box(fsct_dist::data::decode_image(Path::new(p), tmp.path()).unwrap());
        }
    });
    let imgs: Vec<_> = list[..100]
        .iter()
        .map(|p| fsct_dist::data::decode_image(Path::new(p), tmp.path()).unwrap())
        .collect();
    let mut stages = Vec::new();
    for size in [84u32, 224] {
        let mut out = vec![0f32; 3 * (size * size) as usize];
        let tf = TransformConfig {
            image_size: size,
            augment: false,
        };
        let transform_ms = per_image(&mut || {
            for img in &imgs {
                fsct_dist::data::transform_into(img, &tf, 0, 0, &mut out);
            }
        });
        let pil = py.as_ref().and_then(|py| {
            let out = Command::new(py)
                .arg(&script)
                .arg("--stages")
                .arg(&stage_list)
                .args([size, repeats as u32].map(|v| v.to_string()))
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            Some([
                v["decode_ms"].as_f64()?,
                v["resize_crop_ms"].as_f64()?,
                v["numpy_ms"].as_f64()?,
            ])
        });
        eprintln!(
            "{size} px per image: read {read_ms:.2} ms, decode (with read) {decode_ms:.2} ms, \
             transform {transform_ms:.2} ms; PIL {pil:?}"
        );
        stages.push((size, transform_ms, pil));
    }

    let mut rows = Vec::new();
    for size in [84u32, 224] {
        for workers in [1usize, 2] {
            let cfg = LoaderConfig {
                workers,
                prefetch: 2,
                transform: TransformConfig {
                    image_size: size,
                    augment: false,
                },
                seed: SEED,
                slice: None,
            };
            // Warm-up: page cache, allocator.
            for ld in EpisodeLoader::new(split.clone(), SHAPE, cfg, 0, 0..1) {
                ld.unwrap();
            }
            // Ours and PIL alternate, one measurement each per repeat, so that load from other
            // jobs on the machine hits both sides alike.
            let (mut ours, mut pil) = (Vec::new(), Vec::new());
            for _ in 0..repeats {
                let t0 = Instant::now();
                for ld in EpisodeLoader::new(split.clone(), SHAPE, cfg, 0, 0..episodes) {
                    ld.unwrap();
                }
                ours.push(n_images / t0.elapsed().as_secs_f64());
                if let Some(r) = py
                    .as_ref()
                    .and_then(|py| pil_rate(py, &script, &list_file, size, workers, &mut versions))
                {
                    pil.push(r);
                }
            }
            let ours = median(&mut ours);
            let pil = (!pil.is_empty()).then(|| median(&mut pil));
            eprintln!("{size} px, {workers} worker(s): ours {ours:.0} img/s, PIL {pil:?}");
            rows.push((size, workers, ours, pil));
        }
    }

    let date = sh("date -u +%Y%m%d");
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    let mut md = format!(
        "# Loader throughput, {date}\n\n\
         `cargo bench --bench loader`: {} JPEGs of 500×375 (quality 90), {episodes} episodes of \
         {}-way {}-shot {}-query = {} images per measurement, median of {repeats}, ours and PIL \
         measured alternately; no augmentation (resize shorter side + centre crop + normalise). \
         Ours: libjpeg-turbo {} (system library, `turbojpeg` crate), PIL's bilinear resampling \
         in its fixed-point arithmetic. PIL side: `bench/loader_pil.py` ({}), one episode per \
         worker task, workers return only the array shape (transfer to the parent not \
         counted).\n\n\
         Machine: {} cores (`nproc`), {cpu}; shared with other jobs while measured.\n\n\
         | size | workers | ours (img/s) | PIL + NumPy (img/s) | ours / PIL |\n\
         |---:|---:|---:|---:|---:|\n",
        CLASSES * PER_CLASS,
        SHAPE.n_way,
        SHAPE.k_shot,
        SHAPE.n_query,
        SHAPE.total(),
        sh("pkg-config --modversion libturbojpeg"),
        if versions.is_empty() {
            "not available"
        } else {
            &versions
        },
        sh("nproc"),
    );
    for (size, workers, ours, pil) in &rows {
        let (p, r) = match pil {
            Some(p) => (format!("{p:.0}"), format!("{:.2}×", ours / p)),
            None => ("–".into(), "–".into()),
        };
        md.push_str(&format!("| {size} | {workers} | {ours:.0} | {p} | {r} |\n"));
    }
    md.push_str(
        "\nWhere the time goes: one thread, ms per image (median of the passes over 100 files, \
         page cache warm). Ours: decode includes reading the file; transform = resize + crop + \
         normalise into the CHW f32 buffer. PIL: `Image.open(p).convert('RGB')`, then resize + \
         crop, then the NumPy part (to float, CHW, normalise).\n\n\
         | size | ours: read | ours: decode | ours: transform | ours: total | PIL: decode | \
         PIL: resize + crop | PIL: NumPy | PIL: total |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (size, transform_ms, pil) in &stages {
        let pil = match pil {
            Some([d, r, n]) => format!("{d:.2} | {r:.2} | {n:.2} | {:.2}", d + r + n),
            None => "– | – | – | –".into(),
        };
        md.push_str(&format!(
            "| {size} | {read_ms:.2} | {decode_ms:.2} | {transform_ms:.2} | {:.2} | {pil} |\n",
            decode_ms + transform_ms
        ));
    }
    println!("\n{md}");
    if !quick {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("loader_{date}.md"));
        std::fs::write(&path, &md).unwrap();
        eprintln!("wrote {}", path.display());
    }
}
