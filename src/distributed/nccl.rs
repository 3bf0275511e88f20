//! The NCCL backend: GPU tensors all-reduced and gathered in place by NCCL, opened at run time
//! from `libnccl.so.2` (the torch wheels ship it; no CUDA toolkit is needed to build). The unique
//! id is made by rank 0 and broadcast over MPI; host values (losses, flags) go over MPI.
//!
//! Streams: every collective of a communicator is queued on its one side stream
//! ([`SideStream`], from libtorch's pool), as ProcessGroupNCCL does: NCCL runs a communicator's
//! operations in the order each stream gives them, and two streams could put them in different
//! orders on different ranks, which deadlocks. CUDA events order the side stream after the work
//! queued on the compute stream before each call; a blocking call also makes the compute stream
//! wait for it, an overlapped reduction of `--overlap` (started during the backward) only at
//! [`Communicator::finish_all_reduces`], so the optimizer (and the fp16 inf check) reads final
//! sums while the backward of earlier layers ran beside the reductions. The host never waits.
//! Without a side stream (`--overlap off`, or libtorch could not make one) the calls go on the
//! default stream, in order with the kernels around them, and nothing overlaps.

use std::ffi::{c_char, c_int, c_void, CStr};

use anyhow::Result;
use libloading::{Library, Symbol};
use tch::{Device, Kind, Tensor};

use super::mpi::MpiComm;
use super::{per_bucket, ByteCounter, Communicator, DistError, World};
use crate::ffi::cuda::SideStream;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type NcclComm_ = *mut c_void;
type Stream = *mut c_void;
type NcclResult = c_int;

const NCCL_SUM: c_int = 0;
/// The legacy default stream, libtorch's current stream (we change it only inside
/// [`SideStream::run`]).
const DEFAULT_STREAM: Stream = std::ptr::null_mut();

/// `ncclAllReduce(send, recv, count, type, op, comm, stream)` and
/// `ncclBroadcast(send, recv, count, type, root, comm, stream)`: one C signature.
type SendRecvFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    NcclComm_,
    Stream,
) -> NcclResult;

/// `ncclReduce(send, recv, count, type, op, root, comm, stream)`.
type ReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    c_int,
    NcclComm_,
    Stream,
) -> NcclResult;

/// `ncclAllGather(send, recv, sendcount, type, comm, stream)`.
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, NcclComm_, Stream) -> NcclResult;

/// `ncclCommAbort(comm)` and `ncclCommDestroy(comm)`.
type CommFn = unsafe extern "C" fn(NcclComm_) -> NcclResult;

/// ncclDataType_t for a tensor kind.
fn nccl_type(kind: Kind) -> Result<c_int, DistError> {
    Ok(match kind {
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        kind => {
            return Err(DistError::NotFloat {
                backend: "NCCL",
                kind,
            })
        }
    })
}

/// The symbol `name` of libnccl.
///
/// # Safety
/// `T` must be the symbol's C signature.
unsafe fn symbol<'l, T>(lib: &'l Library, name: &str) -> Result<Symbol<'l, T>, DistError> {
    // SAFETY: the caller names the symbol's true type.
    unsafe { lib.get(name.as_bytes()) }.map_err(|e| DistError::NcclSymbol {
        symbol: name.to_owned(),
        cause: e.to_string(),
    })
}

/// The library names tried, in order: the soname (already loaded when libtorch_cuda is), the
/// development name, and the copy beside the torch wheel this binary was built against.
fn candidates() -> Vec<String> {
    let mut v = vec!["libnccl.so.2".to_owned(), "libnccl.so".to_owned()];
    if let Some(lib) = option_env!("FSCT_TORCH_LIB") {
        v.push(format!("{lib}/../../nvidia/nccl/lib/libnccl.so.2"));
    }
    v
}

fn load() -> Result<Library, DistError> {
    let mut errors = Vec::new();
    for name in candidates() {
        // SAFETY: loading NCCL runs its (well-behaved) initialisers only.
        match unsafe { Library::new(&name) } {
            Ok(lib) => return Ok(lib),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    Err(DistError::NcclLoad {
        tried: errors.join("; "),
    })
}

/// Whether libnccl can be opened and a CUDA device is visible.
pub fn available() -> bool {
    tch::Cuda::is_available() && load().is_ok()
}

pub struct NcclComm {
    lib: Library,
    comm: NcclComm_,
    world: World,
    device: Device,
    mpi: Option<MpiComm>,
    sent: ByteCounter,
    /// The stream every collective runs on (see the module comment); None with `--overlap
    /// off` or if libtorch could not make one: the default stream, nothing overlaps.
    side: Option<SideStream>,
}

impl NcclComm {
    /// A communicator over the MPI world, on `device` (this rank's GPU). `overlap`: queue the
    /// collectives on a side stream, so that reductions can run beside the backward; without it
    /// they stay on the default stream and nothing overlaps (`--overlap off`).
    pub fn new(mpi: MpiComm, device: Device, overlap: bool) -> Result<Self, DistError> {
        let world = mpi.world();
        Self::create(Some(mpi), world, device, overlap)
    }

    /// A one-rank NCCL communicator (no MPI): exercises the NCCL path on a single GPU.
    pub fn single(device: Device, overlap: bool) -> Result<Self, DistError> {
        Self::create(None, World::SINGLE, device, overlap)
    }

    fn create(
        mpi: Option<MpiComm>,
        world: World,
        device: Device,
        overlap: bool,
    ) -> Result<Self, DistError> {
        match Self::connect(mpi.as_ref(), world, device) {
            Ok((lib, comm)) => {
                let Device::Cuda(index) = device else {
                    unreachable!("connect accepts CUDA devices only")
                };
                let side = overlap
                    .then(|| {
                        SideStream::new(index)
                            .map_err(|e| tracing::warn!("no side stream for --overlap: {e}"))
                            .ok()
                    })
                    .flatten();
                Ok(Self {
                    lib,
                    comm,
                    world,
                    device,
                    mpi,
                    sent: ByteCounter::default(),
                    side,
                })
            }
            Err(e) => {
                // Keep MPI initialised (no MPI_Finalize from the drop): the caller ends the job
                // with MPI_Abort, which needs it, instead of leaving the other ranks waiting.
                std::mem::forget(mpi);
                Err(e)
            }
        }
    }

    /// Opens libnccl and joins the communicator: (library, ncclComm_t).
    fn connect(
        mpi: Option<&MpiComm>,
        world: World,
        device: Device,
    ) -> Result<(Library, NcclComm_), DistError> {
        let Device::Cuda(index) = device else {
            return Err(DistError::NcclNeedsCuda { device });
        };
        if !tch::Cuda::is_available() {
            return Err(DistError::NoCudaDevice);
        }
        let lib = load()?;
        crate::ffi::cuda::set_device(index).map_err(|e| DistError::SelectGpu {
            index,
            cause: e.to_string(),
        })?;
        let mut id = UniqueId { internal: [0; 128] };
        if world.rank == 0 {
            // SAFETY: the symbol has this C signature in every NCCL 2.x.
            let get_id: Symbol<unsafe extern "C" fn(*mut UniqueId) -> NcclResult> =
                unsafe { symbol(&lib, "ncclGetUniqueId")? };
            check(&lib, unsafe { get_id(&mut id) }, "ncclGetUniqueId")?;
        }
        if let Some(m) = mpi {
            // SAFETY: UniqueId is 128 plain bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(id.internal.as_mut_ptr().cast::<u8>(), 128)
            };
            m.broadcast_bytes(bytes, 0);
        }
        let mut comm: NcclComm_ = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank(ncclComm_t*, int nranks, ncclUniqueId, int rank).
        let init: Symbol<
            unsafe extern "C" fn(*mut NcclComm_, c_int, UniqueId, c_int) -> NcclResult,
        > = unsafe { symbol(&lib, "ncclCommInitRank")? };
        check(
            &lib,
            unsafe { init(&mut comm, world.size as c_int, id, world.rank as c_int) },
            "ncclCommInitRank",
        )?;
        Ok((lib, comm))
    }

    fn on_device(&self, t: &Tensor) -> Result<(), DistError> {
        if t.device() != self.device || !t.is_contiguous() {
            return Err(DistError::NotOnDevice {
                expected: self.device,
                got: t.device(),
                contiguous: t.is_contiguous(),
            });
        }
        Ok(())
    }

    /// `ncclAllReduce` (`arg` = the reduction) or `ncclBroadcast` (`arg` = the root) of `t`
    /// in place: the two share one C signature.
    fn in_place(
        &self,
        call: &'static str,
        t: &Tensor,
        arg: c_int,
        stream: Stream,
    ) -> Result<(), DistError> {
        self.on_device(t)?;
        // SAFETY: both calls have this signature; buffers are the tensor's device memory.
        let f: Symbol<SendRecvFn> = unsafe { symbol(&self.lib, call)? };
        let p = t.data_ptr();
        let kind = nccl_type(t.kind())?;
        // SAFETY: `t` is contiguous on this communicator's device and holds numel elements.
        let rc = unsafe { f(p, p, t.numel(), kind, arg, self.comm, stream) };
        check(&self.lib, rc, call)
    }

    /// `ncclReduce` of `t` in place (sum into `root`'s buffer; the others' buffers are only
    /// read, NCCL writes the receive buffer on the root alone).
    fn reduce_in_place(&self, t: &Tensor, root: usize, stream: Stream) -> Result<(), DistError> {
        self.on_device(t)?;
        // SAFETY: the C signature of ncclReduce in every NCCL 2.x.
        let f: Symbol<ReduceFn> = unsafe { symbol(&self.lib, "ncclReduce")? };
        let p = t.data_ptr();
        let kind = nccl_type(t.kind())?;
        // SAFETY: `t` is contiguous on this communicator's device and holds numel elements.
        let rc = unsafe {
            f(
                p,
                p,
                t.numel(),
                kind,
                NCCL_SUM,
                root as c_int,
                self.comm,
                stream,
            )
        };
        check(&self.lib, rc, "ncclReduce")
    }

    fn host(&self) -> Option<&MpiComm> {
        self.mpi.as_ref()
    }

    /// The bucketed all-reduce, queued on `stream` (bucket copies on the current stream, which
    /// the caller made `stream` for a side stream).
    fn all_reduce_on(&self, tensors: &[Tensor], stream: Stream) -> Result<()> {
        per_bucket(tensors, |flat| {
            self.in_place("ncclAllReduce", flat, NCCL_SUM, stream)?;
            self.sent.add(&[flat]);
            Ok(flat.shallow_clone())
        })
    }

    fn reduce_on(&self, tensors: &[Tensor], root: usize, stream: Stream) -> Result<()> {
        per_bucket(tensors, |flat| {
            self.reduce_in_place(flat, root, stream)?;
            if self.world.rank != root {
                self.sent.add(&[flat]);
            }
            Ok(flat.shallow_clone())
        })
    }

    /// Runs `call` (its NCCL calls on the stream it is given, its tensor operations on the
    /// current one) on this communicator's stream; see the module comment. `wait`: the compute
    /// stream waits for it (a blocking call), else only `finish_all_reduces` does.
    fn on_stream<T>(&self, wait: bool, call: impl FnOnce(Stream) -> Result<T>) -> Result<T> {
        let Some(side) = &self.side else {
            return call(DEFAULT_STREAM);
        };
        let out = side.run(call)??;
        if wait {
            side.join()?;
        }
        Ok(out)
    }

    fn all_gather_on(&self, local: &Tensor, rows: &[i64], stream: Stream) -> Result<Tensor> {
        // NCCL gathers equal counts: pad every rank's rows to the largest, then drop the padding.
        let max = rows.iter().copied().max().unwrap_or(0);
        let size = local.size();
        let pad = max - size[0];
        let padded = if pad > 0 {
            let mut shape = size.clone();
            shape[0] = pad;
            Tensor::cat(
                &[
                    local.shallow_clone(),
                    Tensor::zeros(&shape[..], (local.kind(), local.device())),
                ],
                0,
            )
        } else {
            local.contiguous()
        };
        self.on_device(&padded)?;
        let mut out_shape = size.clone();
        out_shape[0] = max * self.world.size as i64;
        let out = Tensor::empty(&out_shape[..], (local.kind(), local.device()));
        // SAFETY: signature of ncclAllGather; `out` holds size × sendcount elements.
        let f: Symbol<AllGatherFn> = unsafe { symbol(&self.lib, "ncclAllGather")? };
        check(
            &self.lib,
            unsafe {
                f(
                    padded.data_ptr(),
                    out.data_ptr(),
                    padded.numel(),
                    nccl_type(local.kind())?,
                    self.comm,
                    stream,
                )
            },
            "ncclAllGather",
        )?;
        self.sent.add(&[&padded]);
        let pieces: Vec<Tensor> = rows
            .iter()
            .enumerate()
            .map(|(r, &n)| out.narrow(0, r as i64 * max, n))
            .collect();
        Ok(Tensor::cat(&pieces, 0))
    }

    fn broadcast_on(&self, tensors: &[Tensor], root: usize, stream: Stream) -> Result<()> {
        for t in tensors {
            let c = t.contiguous();
            self.in_place("ncclBroadcast", &c, root as c_int, stream)?;
            if c.data_ptr() != t.data_ptr() {
                let mut dst = t.shallow_clone();
                tch::no_grad(|| dst.copy_(&c));
            }
        }
        Ok(())
    }
}

fn check(lib: &Library, rc: NcclResult, call: &'static str) -> Result<(), DistError> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static string.
    let msg = unsafe {
        lib.get::<unsafe extern "C" fn(NcclResult) -> *const c_char>(b"ncclGetErrorString\0")
            .ok()
            .map(|f| CStr::from_ptr(f(rc)).to_string_lossy().into_owned())
    };
    Err(DistError::NcclCall {
        call,
        code: rc,
        message: msg.unwrap_or_default(),
    })
}

impl Communicator for NcclComm {
    fn world(&self) -> World {
        self.world
    }

    fn name(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.on_stream(true, |s| self.all_reduce_on(tensors, s))
    }

    fn reduce_sum(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.on_stream(true, |s| self.reduce_on(tensors, root, s))
    }

    fn overlaps(&self) -> bool {
        self.side.is_some()
    }

    fn start_all_reduce_sum(&self, tensors: Vec<Tensor>) -> Result<()> {
        self.on_stream(false, |s| self.all_reduce_on(&tensors, s))
    }

    fn start_reduce_sum(&self, tensors: Vec<Tensor>, root: usize) -> Result<()> {
        self.on_stream(false, |s| self.reduce_on(&tensors, root, s))
    }

    fn finish_all_reduces(&self) -> Result<()> {
        if let Some(side) = &self.side {
            side.join()?;
        }
        Ok(())
    }

    fn all_gather_rows(&self, local: &Tensor, rows: &[i64]) -> Result<Tensor> {
        self.on_stream(true, |s| self.all_gather_on(local, rows, s))
    }

    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.on_stream(true, |s| self.broadcast_on(tensors, root, s))
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        match self.host() {
            Some(m) => m.all_reduce_f64(values),
            None => Ok(()),
        }
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        match self.host() {
            Some(m) => m.all_gather_f64(values),
            None => Ok(values.to_vec()),
        }
    }

    fn barrier(&self) -> Result<()> {
        match self.host() {
            Some(m) => m.barrier(),
            None => Ok(()),
        }
    }

    fn abort(&self, code: i32) -> ! {
        // SAFETY: ncclCommAbort(ncclComm_t) frees the communicator without waiting for peers.
        if let Ok(f) = unsafe { self.lib.get::<CommFn>(b"ncclCommAbort\0") } {
            unsafe { f(self.comm) };
        }
        match self.host() {
            Some(m) => m.abort(code),
            None => std::process::exit(code),
        }
    }

    fn abort_handle(&self) -> super::AbortHandle {
        // SAFETY: as in `abort`; the library stays loaded while the process lives (the handle
        // ends it), and the raw communicator is only handed to ncclCommAbort.
        let f = unsafe { self.lib.get::<CommFn>(b"ncclCommAbort\0").map(|s| *s).ok() };
        let comm = self.comm as usize;
        let has_mpi = self.mpi.is_some();
        Box::new(move |code| {
            if let Some(f) = f {
                unsafe { f(comm as NcclComm_) };
            }
            if has_mpi {
                super::mpi::abort_world(code)
            }
            std::process::exit(code)
        })
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: ncclCommDestroy(ncclComm_t); the communicator is not used after this.
        if let Ok(f) = unsafe { self.lib.get::<CommFn>(b"ncclCommDestroy\0") } {
            unsafe { f(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_for_nccl_without_a_gpu_is_an_error_not_a_panic() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = NcclComm::single(Device::Cpu, true)
            .err()
            .expect("CPU cannot host NCCL");
        assert!(err.to_string().contains("--comm mpi"), "{err}");
        let err = NcclComm::single(Device::Cuda(0), true)
            .err()
            .expect("no CUDA device here");
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}
