//! Integration tests of the data module: formats, sampler, transforms, loader, synth, check.
//! Small images and datasets so the whole file runs in seconds on two cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsct_dist::config::Split;
use fsct_dist::data::{
    self, aug_seed_for, check_dataset, load_images, open_split, sample_episode, synth, ClassImages,
    DataError, DatasetFormat, EpisodeLoader, EpisodeShape, LoaderConfig, Rgb, SplitIndex,
    TransformConfig,
};
use image::{ExtendedColorType, ImageEncoder};

// ---------- helpers ----------

fn write_png(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let px: Vec<u8> = (0..w * h * 3)
        .map(|i| ((i * 7 + seed * 31) % 251) as u8)
        .collect();
    let f = std::fs::File::create(path).unwrap();
    image::codecs::png::PngEncoder::new(f)
        .write_image(&px, w, h, ExtendedColorType::Rgb8)
        .unwrap();
}

fn names(split: &SplitIndex) -> Vec<&str> {
    split.classes.iter().map(|c| c.name.as_str()).collect()
}

fn counts(split: &SplitIndex) -> Vec<usize> {
    split.classes.iter().map(|c| c.images.len()).collect()
}

/// A split held in memory with fake paths: enough for the sampler.
fn fake_split(classes: usize, per_class: usize) -> SplitIndex {
    SplitIndex {
        root: PathBuf::from("/nonexistent"),
        split: Split::Base,
        format: DatasetFormat::Folders,
        classes: (0..classes)
            .map(|c| ClassImages {
                name: format!("class{c}"),
                images: (0..per_class)
                    .map(|i| PathBuf::from(format!("/nonexistent/{c}/{i}.png")))
                    .collect(),
            })
            .collect(),
    }
}

fn small_synth(dir: &Path) -> PathBuf {
    let root = dir.join("synth");
    let opts = synth::SynthOptions {
        classes: [6, 3, 3],
        images_per_class: 8,
        size: 32,
        seed: 7,
    };
    synth::write_dataset(&root, &opts).unwrap();
    root
}

const SHAPE: EpisodeShape = EpisodeShape {
    n_way: 3,
    k_shot: 2,
    n_query: 3,
};

// ---------- formats ----------

#[test]
fn json_lists_open_with_labels_sorted_and_relative_paths_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let abs = root.join("elsewhere/x.png");
    let json = serde_json::json!({
        "label_names": ["zero", "one", "two", "three", "four", "five"],
        "image_names": ["imgs/a.png", abs.to_str().unwrap(), "imgs/b.png", "imgs/c.png"],
        "image_labels": [5, 2, 5, 2],
    });
    std::fs::write(root.join("val.json"), json.to_string()).unwrap();
    let split = open_split(root, Split::Val).unwrap();
    assert_eq!(split.format, DatasetFormat::JsonLists);
    assert_eq!(names(&split), ["two", "five"]);
    assert_eq!(split.classes[0].images, [abs, root.join("imgs/c.png")]);
    assert_eq!(
        split.classes[1].images,
        [root.join("imgs/a.png"), root.join("imgs/b.png")]
    );
}

#[test]
fn split_files_with_a_utf8_byte_order_mark_open_like_those_without() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::write(
        root.join("train.csv"),
        "\u{feff}filename,label\nn01_1.jpg,n01\nn02_1.jpg,n02\n",
    )
    .unwrap();
    write_png(&root.join("images/n01_1.jpg"), 4, 4, 0);
    write_png(&root.join("images/n02_1.jpg"), 4, 4, 0);
    let split = open_split(root, Split::Base).unwrap();
    assert_eq!(names(&split), ["n01", "n02"]);
    std::fs::write(
        root.join("val.json"),
        "\u{feff}{\"label_names\": [\"a\"], \"image_names\": [\"images/n01_1.jpg\"], \"image_labels\": [0]}",
    )
    .unwrap();
    let split = open_split(root, Split::Val).unwrap();
    assert_eq!(counts(&split), [1]);
}

#[test]
fn a_split_listing_one_image_twice_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_png(&root.join("images/a.png"), 4, 4, 0);
    write_png(&root.join("images/b.png"), 4, 4, 0);
    for (names, needle) in [
        (
            r#"["images/a.png", "images/./a.png", "images/b.png"]"#,
            "twice in class",
        ),
        (
            r#"["images/a.png", "images/b.png", "images/a.png"]"#,
            "in classes",
        ),
    ] {
        let labels = if needle == "twice in class" {
            "[0, 0, 1]"
        } else {
            "[0, 1, 1]"
        };
        std::fs::write(
            root.join("base.json"),
            format!(
                r#"{{"label_names": ["x", "y"], "image_names": {names}, "image_labels": {labels}}}"#
            ),
        )
        .unwrap();
        let err = open_split(root, Split::Base).unwrap_err().to_string();
        assert!(
            err.contains("more than once") && err.contains(needle),
            "{err}"
        );
        assert!(err.contains("a.png"), "names the file: {err}");
        let report = check_dataset(root, 224).unwrap();
        assert!(
            report.to_string().contains("more than once"),
            "data check reports it: {report}"
        );
    }
}

#[test]
fn mini_imagenet_csv_opens_with_images_folder_and_class_folder_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    // images/<filename>
    let a = tmp.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(
        a.join("train.csv"),
        "filename,label\nn02_1.jpg,n02\nn01_1.jpg,n01\nn02_2.jpg,n02\n",
    )
    .unwrap();
    write_png(&a.join("images/n02_1.jpg"), 4, 4, 0);
    let split = open_split(&a, Split::Base).unwrap();
    assert_eq!(split.format, DatasetFormat::MiniImagenetCsv);
    assert_eq!(names(&split), ["n01", "n02"]);
    assert_eq!(counts(&split), [1, 2]);
    assert_eq!(split.classes[1].images[1], a.join("images/n02_2.jpg"));
    // <label>/<filename>
    let b = tmp.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("test.csv"), "filename,label\nq.jpg,n07\n").unwrap();
    write_png(&b.join("n07/q.jpg"), 4, 4, 0);
    let split = open_split(&b, Split::Novel).unwrap();
    assert_eq!(split.classes[0].images, [b.join("n07/q.jpg")]);
    // neither layout: the error names the missing file
    std::fs::write(b.join("val.csv"), "filename,label\nmissing.jpg,n09\n").unwrap();
    let err = open_split(&b, Split::Val).unwrap_err();
    assert!(matches!(err, DataError::BadImage { .. }), "{err}");
    assert!(err.to_string().contains("missing.jpg"), "{err}");
}

#[test]
fn class_folders_open_with_split_aliases_and_sorted_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_png(&root.join("train/zebra/1.png"), 4, 4, 0);
    write_png(&root.join("train/ant/2.PNG"), 4, 4, 0);
    write_png(&root.join("train/ant/1.jpeg"), 4, 4, 0);
    std::fs::write(root.join("train/ant/notes.txt"), "not an image").unwrap();
    write_png(&root.join("validation/cat/1.png"), 4, 4, 0);
    let base = open_split(root, Split::Base).unwrap();
    assert_eq!(base.format, DatasetFormat::Folders);
    assert_eq!(names(&base), ["ant", "zebra"]);
    assert_eq!(
        base.classes[0].images,
        [root.join("train/ant/1.jpeg"), root.join("train/ant/2.PNG")]
    );
    assert_eq!(names(&open_split(root, Split::Val).unwrap()), ["cat"]);
    let err = open_split(root, Split::Novel).unwrap_err();
    assert!(matches!(err, DataError::MissingSplit { .. }), "{err}");
    assert!(err.to_string().contains("novel.json"), "{err}");
}

#[test]
fn missing_root_and_missing_split_file_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = open_split(&tmp.path().join("nope"), Split::Base).unwrap_err();
    assert!(matches!(err, DataError::MissingRoot { .. }), "{err}");
    std::fs::write(
        tmp.path().join("base.json"),
        r#"{"label_names":[],"image_names":[],"image_labels":[]}"#,
    )
    .unwrap();
    let err = open_split(tmp.path(), Split::Val).unwrap_err();
    assert!(matches!(err, DataError::MissingSplit { .. }), "{err}");
}

#[test]
fn json_with_wrong_types_or_lengths_is_rejected_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("base.json");
    for bad in [
        r#"{"label_names":["a"],"image_names":["x.png"],"image_labels":["0"]}"#,
        r#"{"label_names":["a"],"image_names":"x.png","image_labels":[0]}"#,
        r#"{"label_names":["a"],"image_names":["x.png","y.png"],"image_labels":[0]}"#,
        r#"[1, 2, 3]"#,
    ] {
        std::fs::write(&path, bad).unwrap();
        let err = open_split(tmp.path(), Split::Base).unwrap_err();
        assert!(
            matches!(err, DataError::BadSplitFile { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains("base.json"), "{err}");
    }
}

// ---------- sampler ----------

#[test]
fn sampler_is_a_function_of_seed_epoch_and_index() {
    let split = fake_split(20, 30);
    let e = |seed, epoch, index| sample_episode(&split, SHAPE, seed, epoch, index).unwrap();
    assert_eq!(e(1, 2, 3), e(1, 2, 3));
    assert_ne!(e(1, 2, 3), e(1, 2, 4));
    assert_ne!(e(1, 2, 3), e(1, 3, 3));
    assert_ne!(e(1, 2, 3), e(2, 2, 3));
}

#[test]
fn episodes_have_distinct_classes_distinct_images_in_class_major_order() {
    let split = fake_split(8, 12);
    let shape = EpisodeShape {
        n_way: 5,
        k_shot: 5,
        n_query: 7,
    };
    for index in 0..50 {
        let ep = sample_episode(&split, shape, 0, 0, index).unwrap();
        let mut classes = ep.classes.clone();
        classes.sort();
        classes.dedup();
        assert_eq!(classes.len(), 5);
        assert!(ep.classes.iter().all(|&c| c < 8));
        for imgs in &ep.images {
            let mut v = imgs.clone();
            v.sort();
            v.dedup();
            assert_eq!(v.len(), 12);
            assert!(v.iter().all(|&i| i < 12));
        }
        let flat = ep.flat();
        assert_eq!(flat.len(), shape.total());
        for (p, &(c, i)) in flat.iter().enumerate() {
            let way = p / shape.images_per_class();
            assert_eq!(c, ep.classes[way]);
            assert_eq!(i, ep.images[way][p % shape.images_per_class()]);
        }
    }
}

#[test]
fn too_few_images_per_class_names_the_class_and_the_flags() {
    let mut split = fake_split(6, 10);
    split.classes[4].images.truncate(4);
    let err = sample_episode(&split, SHAPE, 0, 0, 0).unwrap_err();
    match &err {
        DataError::TooFewImages {
            need, have, class, ..
        } => assert_eq!((*need, *have, class.as_str()), (5, 4, "class4")),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("--k_shot"), "{err}");
}

#[test]
fn too_few_classes_says_how_many_and_which_flag() {
    let split = fake_split(2, 10);
    let err = sample_episode(&split, SHAPE, 0, 0, 0).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::TooFewClasses {
                need: 3,
                have: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--n_way to at most 2"), "{err}");
}

// ---------- transforms ----------

fn rgb(w: usize, h: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> Rgb {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&f(x, y));
        }
    }
    Rgb {
        width: w,
        height: h,
        data,
    }
}

fn transform(img: &Rgb, s: u32) -> Vec<f32> {
    let mut out = vec![0f32; 3 * (s * s) as usize];
    let tf = TransformConfig {
        image_size: s,
        augment: false,
    };
    data::transform_into(img, &tf, 0, 0, &mut out);
    out
}

fn norm(v: u8, c: usize) -> f32 {
    (v as f32 / 255.0 - [0.485, 0.456, 0.406][c]) / [0.229, 0.224, 0.225][c]
}

#[test]
fn normalisation_matches_a_hand_computed_pixel() {
    // Already S×S: resize is the identity, so pixel (x=2, y=1) comes through unchanged.
    let img = rgb(4, 4, |x, y| [(x * 60) as u8, (y * 70) as u8, 200]);
    let out = transform(&img, 4);
    let at = |c: usize| out[c * 16 + 4 + 2];
    // (120/255 − 0.485)/0.229 = −0.06293…, (70/255 − 0.456)/0.224 = −0.81022…,
    // (200/255 − 0.406)/0.225 = 1.68140…
    for (c, want) in [-0.062_934f32, -0.810_224, 1.681_394]
        .into_iter()
        .enumerate()
    {
        assert!(
            (at(c) - want).abs() < 1e-4,
            "channel {c}: {} vs {want}",
            at(c)
        );
    }
}

#[test]
fn resize_and_centre_crop_match_pil() {
    // Reference: PIL 13.0 (what torchvision's Resize(3) + CenterCrop(3) call):
    //   b[y,x] = ((x*40+y*7)%256, (y*60)%256, (x*y*23)%256) for a 7×5 image
    //   Image.fromarray(b).resize((4, 3), Image.BILINEAR); crop left = round(0.5) = 0
    let img = rgb(7, 5, |x, y| {
        [
            ((x * 40 + y * 7) % 256) as u8,
            ((y * 60) % 256) as u8,
            ((x * y * 23) % 256) as u8,
        ]
    });
    let pil: [[[u8; 3]; 4]; 3] = [
        [[24, 26, 5], [86, 26, 21], [160, 26, 39], [222, 26, 54]],
        [
            [35, 120, 24],
            [97, 120, 96],
            [171, 120, 139],
            [203, 120, 121],
        ],
        [
            [46, 214, 43],
            [108, 214, 130],
            [182, 214, 97],
            [110, 214, 117],
        ],
    ];
    let out = transform(&img, 3);
    for y in 0..3 {
        for x in 0..3 {
            for c in 0..3 {
                let got = out[c * 9 + y * 3 + x];
                let want = norm(pil[y][x][c], c);
                // PIL works in fixed point: allow one grey level.
                assert!((got - want).abs() <= 1.01 / 255.0 / 0.224, "({x},{y},{c})");
            }
        }
    }
}

#[test]
fn centre_crop_takes_the_middle_of_the_longer_side() {
    // 8×4 at S = 4: no resize, crop left = (8 − 4)/2 = 2.
    let img = rgb(8, 4, |x, _| [(x * 30) as u8, 0, 0]);
    let out = transform(&img, 4);
    assert_eq!(out[0], norm(60, 0));
    assert_eq!(out[3], norm(150, 0));
}

#[test]
fn grayscale_and_alpha_images_become_rgb() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("g.png");
    image::GrayImage::from_pixel(5, 5, image::Luma([90]))
        .save(&g)
        .unwrap();
    let a = tmp.path().join("a.png");
    image::RgbaImage::from_pixel(5, 5, image::Rgba([10, 20, 30, 0]))
        .save(&a)
        .unwrap();
    let gi = data::decode_image(&g, tmp.path()).unwrap();
    assert_eq!(&gi.data[..3], &[90, 90, 90]);
    let ai = data::decode_image(&a, tmp.path()).unwrap();
    assert_eq!(&ai.data[..3], &[10, 20, 30]);
}

// ---------- bad images ----------

#[test]
fn corrupt_and_empty_images_give_an_error_naming_the_file_and_data_check() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for c in ["a", "b", "c"] {
        for i in 0..5 {
            write_png(&root.join(format!("train/{c}/{i}.png")), 6, 6, i);
        }
    }
    std::fs::write(root.join("train/a/0.png"), b"").unwrap();
    std::fs::write(root.join("train/b/0.png"), b"this is not a png").unwrap();
    let split = open_split(root, Split::Base).unwrap();
    let tf = TransformConfig {
        image_size: 4,
        augment: false,
    };
    let ep = data::Episode {
        classes: vec![0, 1],
        images: vec![vec![0], vec![0]],
    };
    for (pos, file, what) in [(0, "a/0.png", "empty"), (1, "b/0.png", "")] {
        let err = load_images(&split, &ep, &[pos], &tf, 0).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::BadImage { .. }), "{msg}");
        assert!(msg.contains(file) && msg.contains(what), "{msg}");
        assert!(msg.contains("fsct-dist data check"), "{msg}");
    }
    // check_dataset reports both, without failing.
    let report = check_dataset(root, 224).unwrap();
    let base = &report.splits[0];
    assert_eq!((base.classes, base.images), (3, 15));
    assert_eq!(base.problems.len(), 2, "{report}");
    assert!(base.problems[0].contains("a/0.png"), "{report}");
    assert!(!report.is_ok());
    assert!(report.splits[1].problems[0].contains("no val split"));
}

// ---------- loader ----------

fn loader_cfg(workers: usize, augment: bool) -> LoaderConfig {
    LoaderConfig {
        workers,
        prefetch: 2,
        transform: TransformConfig {
            image_size: 24,
            augment,
        },
        seed: 11,
        slice: None,
    }
}

fn collect(split: &Arc<SplitIndex>, workers: usize, augment: bool) -> Vec<tch::Tensor> {
    EpisodeLoader::new(split.clone(), SHAPE, loader_cfg(workers, augment), 3, 0..4)
        .enumerate()
        .map(|(i, r)| {
            let ld = r.unwrap();
            assert_eq!((ld.epoch, ld.index), (3, i as u64));
            assert_eq!(ld.images.size(), [3, 5, 3, 24, 24]);
            ld.images
        })
        .collect()
}

#[test]
fn loader_tensors_are_identical_for_1_and_4_workers_with_and_without_augmentation() {
    let tmp = tempfile::tempdir().unwrap();
    let split = Arc::new(open_split(&small_synth(tmp.path()), Split::Base).unwrap());
    for augment in [false, true] {
        let one = collect(&split, 1, augment);
        let four = collect(&split, 4, augment);
        let inline = collect(&split, 0, augment);
        for i in 0..4 {
            assert!(one[i].equal(&four[i]), "augment={augment} episode {i}");
            assert!(one[i].equal(&inline[i]), "augment={augment} episode {i}");
        }
        assert!(!one[0].equal(&one[1]));
    }
    // Augmentation changes the pixels.
    assert!(!collect(&split, 1, true)[0].equal(&collect(&split, 1, false)[0]));
}

#[test]
fn loading_a_subset_gives_the_same_rows_as_the_full_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let split = open_split(&small_synth(tmp.path()), Split::Base).unwrap();
    let ep = sample_episode(&split, SHAPE, 5, 1, 9).unwrap();
    let tf = TransformConfig {
        image_size: 20,
        augment: true,
    };
    let aug = aug_seed_for(5, 1, 9);
    let all: Vec<usize> = (0..SHAPE.total()).collect();
    let full = load_images(&split, &ep, &all, &tf, aug).unwrap();
    let subset = [11usize, 2, 7];
    let part = load_images(&split, &ep, &subset, &tf, aug).unwrap();
    assert_eq!(part.size(), [3, 3, 20, 20]);
    for (row, &p) in subset.iter().enumerate() {
        assert!(
            part.get(row as i64).equal(&full.get(p as i64)),
            "position {p}"
        );
    }
}

#[test]
fn dropping_a_loader_early_stops_its_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let split = Arc::new(open_split(&small_synth(tmp.path()), Split::Base).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut loader = EpisodeLoader::new(split, SHAPE, loader_cfg(2, false), 0, 0..1_000_000);
        loader.next().unwrap().unwrap();
        drop(loader);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the loader did not stop within 20 s of being dropped");
}

#[test]
fn loader_reports_bad_episodes_as_errors() {
    let split = Arc::new(fake_split(2, 10));
    let mut loader = EpisodeLoader::new(split, SHAPE, loader_cfg(2, false), 0, 0..3);
    let err = loader.next().unwrap().unwrap_err();
    assert!(matches!(err, DataError::TooFewClasses { .. }), "{err}");
}

// ---------- synth ----------

#[test]
fn synth_is_deterministic_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let a = small_synth(&tmp.path().join("1"));
    let b = small_synth(&tmp.path().join("2"));
    for f in ["base.json", "novel.json", "images/val/c007_"] {
        if f.ends_with(".json") {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap()
            );
        }
    }
    let novel = open_split(&a, Split::Novel).unwrap();
    assert_eq!((novel.classes.len(), novel.num_images()), (3, 24));
    let img = &novel.classes[1].images[5];
    let rel = img.strip_prefix(&a).unwrap();
    assert_eq!(
        std::fs::read(img).unwrap(),
        std::fs::read(b.join(rel)).unwrap()
    );
    let report = check_dataset(&a, 224).unwrap();
    assert!(report.is_ok(), "{report}");
    // No temporary folders left next to it.
    let leftovers = std::fs::read_dir(tmp.path().join("1")).unwrap().count();
    assert_eq!(leftovers, 1);
}

#[test]
fn synth_classes_differ_more_than_their_instances() {
    // Mean colour of the saturated pixels (the object; backgrounds are greyish) per image:
    // spread of the class means vs spread within classes.
    let tmp = tempfile::tempdir().unwrap();
    let root = small_synth(tmp.path());
    let split = open_split(&root, Split::Base).unwrap();
    let means: Vec<Vec<[f64; 3]>> = split
        .classes
        .iter()
        .map(|c| {
            c.images
                .iter()
                .map(|p| {
                    let img = data::decode_image(p, &root).unwrap();
                    let (mut m, mut n) = ([0f64; 3], 0f64);
                    for px in img.data.chunks(3) {
                        let (hi, lo) = (*px.iter().max().unwrap(), *px.iter().min().unwrap());
                        if hi as f64 - lo as f64 > 0.45 * hi as f64 {
                            for k in 0..3 {
                                m[k] += px[k] as f64;
                            }
                            n += 1.0;
                        }
                    }
                    m.map(|v| v / n.max(1.0))
                })
                .collect()
        })
        .collect();
    let mean = |v: &[[f64; 3]]| {
        let mut m = [0f64; 3];
        for x in v {
            for k in 0..3 {
                m[k] += x[k] / v.len() as f64;
            }
        }
        m
    };
    let d2 = |a: [f64; 3], b: [f64; 3]| (0..3).map(|k| (a[k] - b[k]).powi(2)).sum::<f64>();
    let class_means: Vec<[f64; 3]> = means.iter().map(|v| mean(v)).collect();
    let grand = mean(&class_means);
    let between = class_means.iter().map(|&m| d2(m, grand)).sum::<f64>() / class_means.len() as f64;
    let within = means
        .iter()
        .zip(&class_means)
        .map(|(v, &m)| v.iter().map(|&x| d2(x, m)).sum::<f64>() / v.len() as f64)
        .sum::<f64>()
        / means.len() as f64;
    // Instances vary (within > 0) but classes separate more than instances scatter.
    assert!(within > 1.0, "within {within}");
    assert!(between > within, "between {between} within {within}");
}

#[test]
fn ensure_builtin_creates_once_and_refuses_foreign_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("builtin");
    let opts = synth::SynthOptions {
        classes: [3, 2, 2],
        images_per_class: 3,
        size: 16,
        seed: 1,
    };
    synth::ensure_builtin(&dir, &opts).unwrap();
    std::fs::write(dir.join("sentinel"), "x").unwrap();
    synth::ensure_builtin(&dir, &opts).unwrap();
    assert!(
        dir.join("sentinel").exists(),
        "a complete dataset was rewritten"
    );
    let other = synth::SynthOptions {
        seed: 2,
        ..opts.clone()
    };
    synth::ensure_builtin(&dir, &other).unwrap();
    assert!(
        !dir.join("sentinel").exists(),
        "other options must regenerate"
    );
    let foreign = tmp.path().join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), "x").unwrap();
    assert!(synth::write_dataset(&foreign, &opts).is_err());
    assert!(foreign.join("thesis.tex").exists());
}

#[test]
fn a_slice_loads_exactly_those_images_of_the_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let split = open_split(&small_synth(tmp.path()), Split::Base).unwrap();
    let full = fsct_dist::data::load_episode(&split, SHAPE, &loader_cfg(0, true), 2, 5).unwrap();
    let mut cfg = loader_cfg(0, true);
    cfg.slice = Some((3, 9));
    let part = fsct_dist::data::load_episode(&split, SHAPE, &cfg, 2, 5).unwrap();
    assert_eq!(part.images.size(), [6, 3, 24, 24]);
    let flat = full.images.flatten(0, 1);
    assert!(
        part.images.equal(&flat.narrow(0, 3, 6)),
        "same pixels, same augmentation"
    );
}

#[test]
fn a_loader_over_a_list_of_indices_yields_them_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let split = Arc::new(open_split(&small_synth(tmp.path()), Split::Base).unwrap());
    let got: Vec<u64> =
        EpisodeLoader::with_indices(split, SHAPE, loader_cfg(2, false), 0, vec![5, 1, 3])
            .map(|r| r.unwrap().index)
            .collect();
    assert_eq!(got, [5, 1, 3]);
}
