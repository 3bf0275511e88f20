//! PIL's bilinear resampler, in PIL's own fixed-point arithmetic (22-bit integer weights,
//! horizontal pass rounded to u8, then vertical), computing only the window that is kept.

use super::Rgb;

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Taps of a 1-D resampling: output `o` reads `len[o]` inputs from `start[o]` with the
/// fixed-point `weights[o * stride ..]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
    stride: usize,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter, same arithmetic:
/// the box [lo, lo + box_len) is mapped onto `out_full` outputs, of which outputs
/// `out0 .. out0 + n` are computed; taps are clamped to the box.
fn taps(lo: usize, box_len: usize, out_full: usize, out0: usize, n: usize) -> Taps {
    let scale = box_len as f64 / out_full as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // triangle filter of support 1, widened when downscaling
    let ss = 1.0 / filterscale;
    let stride = (support.ceil() as usize) * 2 + 1;
    let mut t = Taps {
        start: Vec::with_capacity(n),
        len: Vec::with_capacity(n),
        weights: vec![0; n * stride],
        stride,
    };
    let mut k = vec![0f64; stride];
    for (j, o) in (out0..out0 + n).enumerate() {
        let center = (o as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).floor() as usize).min(box_len);
        let len = xmax.saturating_sub(xmin).min(stride);
        let mut sum = 0.0;
        for (i, kx) in k[..len].iter_mut().enumerate() {
            let x = (i + xmin) as f64 - center + 0.5;
            let v = 1.0 - (x * ss).abs();
            *kx = if v > 0.0 { v } else { 0.0 };
            sum += *kx;
        }
        let w = &mut t.weights[j * stride..j * stride + len];
        for (wi, &kx) in w.iter_mut().zip(&k[..len]) {
            let kx = if sum != 0.0 { kx / sum } else { kx };
            let f = kx * (1u32 << PRECISION_BITS) as f64;
            *wi = if f < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        t.start.push(lo + xmin);
        t.len.push(len);
    }
    t
}

/// PIL's `clip8`: fixed-point sum → u8.
#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Taps of one pass padded to a fixed count `k` (zero weights), each start moved left where
/// needed so that `start + k` stays inside the box `[lo, lo + box_len)`. `None` if the box is
/// shorter than `k` (tiny images; the unpadded path handles them).
fn padded(t: &Taps, k: usize, lo: usize, box_len: usize) -> Option<(Vec<usize>, Vec<i32>)> {
    if box_len < k {
        return None;
    }
    let end = lo + box_len;
    let mut starts = Vec::with_capacity(t.start.len());
    let mut weights = vec![0i32; t.start.len() * k];
    for (o, (&s, &n)) in t.start.iter().zip(&t.len).enumerate() {
        let s2 = if s + k > end { end - k } else { s };
        let shift = s - s2;
        weights[o * k + shift..o * k + shift + n]
            .copy_from_slice(&t.weights[o * t.stride..o * t.stride + n]);
        starts.push(s2);
    }
    Some((starts, weights))
}

/// Horizontal pass with exactly `K` taps per output (zero-padded): rows `rows` of `src` into
/// `mid`, one RGB triple per entry of `starts`. The fixed count lets the compiler unroll the
/// taps and drop the bounds checks.
#[inline(never)]
fn h_pass_fixed<const K: usize>(
    src: &Rgb,
    rows: std::ops::Range<usize>,
    starts: &[usize],
    weights: &[i32],
    mid: &mut [u8],
) {
    let line = starts.len() * 3;
    let stride = src.width * 3;
    for (y, out) in rows.zip(mid.chunks_exact_mut(line)) {
        let row = &src.data[y * stride..(y + 1) * stride];
        for ((px_out, &s), w) in out
            .chunks_exact_mut(3)
            .zip(starts)
            .zip(weights.chunks_exact(K))
        {
            let px = &row[s * 3..s * 3 + 3 * K];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for k in 0..K {
                r += px[3 * k] as i32 * w[k];
                g += px[3 * k + 1] as i32 * w[k];
                b += px[3 * k + 2] as i32 * w[k];
            }
            px_out[0] = clip8(r);
            px_out[1] = clip8(g);
            px_out[2] = clip8(b);
        }
    }
}

/// Horizontal pass, any tap counts (the fallback of [`h_pass_fixed`]).
fn h_pass_any(src: &Rgb, rows: std::ops::Range<usize>, th: &Taps, mid: &mut [u8]) {
    let line = th.start.len() * 3;
    let stride = src.width * 3;
    for (y, out) in rows.zip(mid.chunks_exact_mut(line)) {
        let row = &src.data[y * stride..(y + 1) * stride];
        for (o, px_out) in out.chunks_exact_mut(3).enumerate() {
            let (s, n) = (th.start[o], th.len[o]);
            let w = &th.weights[o * th.stride..o * th.stride + n];
            let px = &row[s * 3..(s + n) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &wk) in px.chunks_exact(3).zip(w) {
                r += p[0] as i32 * wk;
                g += p[1] as i32 * wk;
                b += p[2] as i32 * wk;
            }
            px_out[0] = clip8(r);
            px_out[1] = clip8(g);
            px_out[2] = clip8(b);
        }
    }
}

/// Vertical pass: output row `o` is the weighted sum of rows `start[o] - r0 ..` of `mid`
/// (each `line` bytes). Columns go in blocks of `B` so the sums stay in registers. Compiled
/// twice: for AVX2 (8-lane 32-bit multiplies) where the CPU has it, else for the baseline
/// (SSE2 has no 32-bit lane multiply).
fn v_pass(tv: &Taps, r0: usize, mid: &[u8], line: usize, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { v_pass_avx2(tv, r0, mid, line, dst) };
    }
    v_pass_body(tv, r0, mid, line, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn v_pass_avx2(tv: &Taps, r0: usize, mid: &[u8], line: usize, dst: &mut [u8]) {
    v_pass_body(tv, r0, mid, line, dst)
}

#[inline(always)]
fn v_pass_body(tv: &Taps, r0: usize, mid: &[u8], line: usize, dst: &mut [u8]) {
    const B: usize = 32;
    for (o, d) in dst.chunks_exact_mut(line).enumerate() {
        let s = tv.start[o] - r0;
        let w = &tv.weights[o * tv.stride..o * tv.stride + tv.len[o]];
        let rows = &mid[s * line..(s + w.len()) * line];
        let mut x = 0;
        while x + B <= line {
            let mut acc = [HALF; B];
            for (k, &wk) in w.iter().enumerate() {
                let r: &[u8; B] = rows[k * line + x..k * line + x + B].try_into().unwrap();
                for (a, &p) in acc.iter_mut().zip(r) {
                    *a += p as i32 * wk;
                }
            }
            for (dd, &a) in d[x..x + B].iter_mut().zip(&acc) {
                *dd = clip8(a);
            }
            x += B;
        }
        for (xx, dd) in d.iter_mut().enumerate().skip(x) {
            let mut a = HALF;
            for (k, &wk) in w.iter().enumerate() {
                a += rows[k * line + xx] as i32 * wk;
            }
            *dd = clip8(a);
        }
    }
}

/// A box of the source (x, y, w, h) resampled to `out_w`×`out_h`, of which only the window
/// (wx, wy, ww, wh) is computed: horizontal pass first on the source rows the window needs,
/// rounded to u8, then vertical, in PIL's fixed-point arithmetic (so the pixels are PIL's).
pub(super) fn resample(
    src: &Rgb,
    bx: (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
    win: (usize, usize, usize, usize),
) -> Rgb {
    let (x0, y0, bw, bh) = bx;
    let (wx, wy, ww, wh) = win;
    let th = taps(x0, bw, out_w, wx, ww);
    let tv = taps(y0, bh, out_h, wy, wh);
    // Source rows the vertical pass reads.
    let r0 = tv.start.iter().copied().min().unwrap_or(0);
    let r1 = tv
        .start
        .iter()
        .zip(&tv.len)
        .map(|(s, l)| s + l)
        .max()
        .unwrap_or(0)
        .max(r0);
    let line = ww * 3;
    let mut dst = vec![0u8; wh * line];
    if line == 0 || wh == 0 {
        return Rgb {
            width: ww,
            height: wh,
            data: dst,
        };
    }
    let mut mid = vec![0u8; (r1 - r0) * line];
    let k = th.len.iter().copied().max().unwrap_or(0);
    let fixed = padded(&th, k, x0, bw);
    macro_rules! by_taps {
        ($($n:literal)*) => {
            match (k, &fixed) {
                $(($n, Some((st, w))) => h_pass_fixed::<$n>(src, r0..r1, st, w, &mut mid),)*
                _ => h_pass_any(src, r0..r1, &th, &mut mid),
            }
        };
    }
    by_taps!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    v_pass(&tv, r0, &mid, line, &mut dst);
    Rgb {
        width: ww,
        height: wh,
        data: dst,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_is_pils_fixed_point_exactly() {
        // PIL 13.0: b[y,x] = ((x*40+y*7)%256, (y*60)%256, (x*y*23)%256), 7×5,
        // Image.fromarray(b).resize((4, 3), Image.BILINEAR).
        let (w, h) = (7, 5);
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend(
                    [(x * 40 + y * 7) % 256, (y * 60) % 256, (x * y * 23) % 256].map(|v| v as u8),
                );
            }
        }
        let img = Rgb {
            width: w,
            height: h,
            data,
        };
        let pil: [[u8; 12]; 3] = [
            [24, 26, 5, 86, 26, 21, 160, 26, 39, 222, 26, 54],
            [35, 120, 24, 97, 120, 96, 171, 120, 139, 203, 120, 121],
            [46, 214, 43, 108, 214, 130, 182, 214, 97, 110, 214, 117],
        ];
        let full = resample(&img, (0, 0, w, h), 4, 3, (0, 0, 4, 3));
        assert_eq!(full.data, pil.concat());
        // A window of the same resize gives the same pixels.
        let win = resample(&img, (0, 0, w, h), 4, 3, (1, 1, 2, 2));
        assert_eq!(win.data, [&pil[1][3..9], &pil[2][3..9]].concat());
    }
}
