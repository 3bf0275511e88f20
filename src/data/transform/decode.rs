//! Decoding: a JPEG or PNG file to 8-bit RGB, with PIL's decoder for JPEGs and the pixel limits
//! that keep a hostile header from allocating gigabytes.

use std::path::Path;

use crate::data::DataError;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Reads and decodes a JPEG or PNG file to RGB. `root` is only used in the error message.
///
/// JPEGs (recognised by their content) go through libjpeg-turbo, the decoder PIL uses, at full
/// resolution with its default settings (accurate integer IDCT, fancy upsampling), so the pixels
/// are PIL's. Anything libjpeg-turbo rejects or only decodes with a warning (CMYK/YCCK, truncated
/// or slightly corrupt files) and every other format go through the `image` crate, as before.
pub fn decode_image(path: &Path, root: &Path) -> Result<Rgb, DataError> {
    decode_image_for(path, root, None)
}

/// [`decode_image`] for a transform to `image_size` px: also refuses an image whose resize
/// would allocate more than the pixel limit (an extreme aspect ratio such as 170,000,000×1 is
/// small on disk but resizes to billions of pixels). Loading and `data check` both call this,
/// so they refuse exactly the same files.
pub fn decode_image_for(
    path: &Path,
    root: &Path,
    image_size: Option<u32>,
) -> Result<Rgb, DataError> {
    let bad = |reason: String| DataError::BadImage {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        reason,
    };
    let bytes = crate::regular_file::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.is_empty() {
        return Err(bad("the file is empty (0 bytes)".into()));
    }
    // Refuse absurd sizes from the header alone, before any decoder allocates for them.
    if let Ok((w, h)) = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?
        .into_dimensions()
    {
        if (w as usize).saturating_mul(h as usize) > MAX_PIXELS {
            return Err(bad(format!(
                "the image claims {w}×{h} pixels, above the {MAX_PIXELS}-pixel limit (a corrupt or hostile file?)"
            )));
        }
        check_resize(w as u64, h as u64, image_size).map_err(&bad)?;
    }
    let img = match decode_jpeg_turbo(&bytes) {
        Some(img) => img,
        None => {
            let img = image::load_from_memory(&bytes).map_err(|e| bad(e.to_string()))?;
            let rgb = img.into_rgb8();
            let (w, h) = rgb.dimensions();
            Rgb {
                width: w as usize,
                height: h as usize,
                data: rgb.into_raw(),
            }
        }
    };
    if img.width == 0 || img.height == 0 {
        return Err(bad("the image has no pixels".into()));
    }
    // Again on the decoded size, for formats whose header could not be read up front.
    check_resize(img.width as u64, img.height as u64, image_size).map_err(bad)?;
    Ok(img)
}

/// Refuses a w×h image whose resize to `image_size` on its short side (torchvision `Resize`)
/// needs more than [`MAX_PIXELS`] pixels.
fn check_resize(w: u64, h: u64, image_size: Option<u32>) -> Result<(), String> {
    let Some(s) = image_size else { return Ok(()) };
    let (short, long) = (w.min(h).max(1) as u128, w.max(h) as u128);
    let s = u128::from(s);
    let resized = s * (s * long / short);
    if resized > MAX_PIXELS as u128 {
        return Err(format!(
            "the image is {w}×{h} pixels: resizing it to {s} px on its short side needs \
             {resized} pixels, above the {MAX_PIXELS}-pixel limit (an extreme aspect ratio; \
             crop or remove the file)"
        ));
    }
    Ok(())
}

thread_local! {
    /// One TurboJPEG handle per thread (loader workers decode many files each).
    static TURBO: std::cell::RefCell<Option<turbojpeg::Decompressor>> =
        const { std::cell::RefCell::new(None) };
}

/// Images above this many pixels are refused before decoding (PIL's decompression-bomb error
/// threshold): a corrupt or hostile header must not make a loader thread allocate gigabytes.
pub const MAX_PIXELS: usize = 2 * 89_478_485;

/// Full-resolution RGB decode of a JPEG by libjpeg-turbo; `None` if it is not a JPEG, is
/// CMYK/YCCK, or libjpeg-turbo reports any error or warning (the caller then falls back).
fn decode_jpeg_turbo(bytes: &[u8]) -> Option<Rgb> {
    use turbojpeg::{Colorspace, Image, PixelFormat};
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return None;
    }
    TURBO.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(turbojpeg::Decompressor::new().ok()?);
        }
        let tj = slot.as_mut()?;
        let header = tj.read_header(bytes).ok()?;
        if !matches!(
            header.colorspace,
            Colorspace::YCbCr | Colorspace::RGB | Colorspace::Gray
        ) {
            return None;
        }
        let (width, height) = (header.width, header.height);
        if width == 0 || height == 0 {
            return None;
        }
        let mut data = vec![0u8; width * height * 3];
        let out = Image {
            pixels: data.as_mut_slice(),
            width,
            pitch: width * 3,
            height,
            format: PixelFormat::RGB,
        };
        tj.decompress(bytes, out).ok()?;
        Some(Rgb {
            width,
            height,
            data,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::ExtendedColorType;

    fn jpeg(w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
        let ch = if color == ExtendedColorType::L8 { 1 } else { 3 };
        let px: Vec<u8> = (0..w * h * ch)
            .map(|i| ((i * 7 + (i / (w * ch)) * 13) % 251) as u8)
            .collect();
        let mut buf = Vec::new();
        JpegEncoder::new_with_quality(&mut buf, 90)
            .encode(&px, w, h, color)
            .unwrap();
        buf
    }

    #[test]
    fn jpegs_go_through_libjpeg_turbo_and_agree_with_the_image_crate() {
        for (color, w, h) in [
            (ExtendedColorType::Rgb8, 37, 21),
            (ExtendedColorType::L8, 16, 9),
        ] {
            let bytes = jpeg(w, h, color);
            let ours = decode_jpeg_turbo(&bytes).expect("libjpeg-turbo decodes it");
            let theirs = image::load_from_memory(&bytes).unwrap().into_rgb8();
            assert_eq!((ours.width, ours.height), (w as usize, h as usize));
            // Two IDCT implementations: a grey level or two apart at most.
            let worst = ours
                .data
                .iter()
                .zip(theirs.as_raw())
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .max()
                .unwrap();
            assert!(worst <= 3, "{color:?}: {worst}");
            if color == ExtendedColorType::L8 {
                assert!(ours.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
            }
        }
        assert!(decode_jpeg_turbo(b"\x89PNG\r\n\x1a\n").is_none());
    }

    #[test]
    fn files_libjpeg_turbo_rejects_fall_back_to_the_image_crate() {
        // Truncated JPEGs: libjpeg-turbo warns (we do not take its output); whatever the `image`
        // crate made of such a file before is what decode_image still gives.
        let tmp = tempfile::tempdir().unwrap();
        let bytes = jpeg(64, 48, ExtendedColorType::Rgb8);
        for cut in [bytes.len() - 2, bytes.len() / 2, 20] {
            let p = tmp.path().join(format!("cut{cut}.jpg"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let before = image::load_from_memory(&bytes[..cut]).map(|i| i.into_rgb8());
            match (decode_image(&p, tmp.path()), before) {
                (Ok(a), Ok(b)) => assert_eq!(a.data, b.into_raw(), "cut at {cut}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("cut at {cut}: now {:?}, before {:?}", a.is_ok(), b.is_ok()),
            }
        }
    }

    #[test]
    fn a_header_claiming_too_many_pixels_is_refused_before_decoding() {
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut bytes)
            .encode(
                &[128u8; 16 * 16 * 3],
                16,
                16,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        let sof = bytes.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
        bytes[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.jpg");
        std::fs::write(&path, &bytes).unwrap();
        let err = decode_image(&path, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("60000×60000") && err.contains("limit"),
            "{err}"
        );
    }
}
