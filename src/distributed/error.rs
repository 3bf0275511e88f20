//! One error type for ranks and collectives. Every message says what went wrong and what to do;
//! the [`super::Communicator`] methods still return `anyhow::Result`, so callers that need the
//! kind downcast to [`DistError`].

use tch::{Device, Kind};

/// What can go wrong while joining the job or moving tensors between ranks.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    // === Launch ===
    #[error(
        "the launcher started {launched} ranks but MPI reports a world of {mpi}: this binary was \
         built against a different MPI than the `mpirun` that launched it. Use the mpirun of \
         the MPI that `launch/setup.sh` installed (OpenMPI: /usr/bin/mpirun), or launch/mpirun.sh"
    )]
    LauncherMismatch { launched: usize, mpi: usize },

    #[error(
        "MPI was already initialised in this process (only one communicator can be made); \
         this is a bug in fsct-dist, please report it"
    )]
    MpiInitialisedTwice,

    // === NCCL set-up ===
    #[error(
        "NCCL is not available ({tried}). Install the CUDA torch wheels (launch/setup.sh on a \
         GPU machine installs them), or run with --comm mpi"
    )]
    NcclLoad {
        /// Each library name tried, with the loader's reason.
        tried: String,
    },

    #[error(
        "the loaded libnccl has no {symbol} ({cause}); it is not an NCCL 2.x library: install \
         the CUDA torch wheels (launch/setup.sh), or run with --comm mpi"
    )]
    NcclSymbol { symbol: String, cause: String },

    #[error(
        "--comm nccl needs a CUDA device (--device cuda), not {device:?}; use --comm mpi on CPU"
    )]
    NcclNeedsCuda { device: Device },

    #[error(
        "--comm nccl: no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), \
         or use --comm mpi"
    )]
    NoCudaDevice,

    #[error(
        "selecting GPU {index} for this rank's NCCL communicator failed: {cause}; check \
         nvidia-smi and CUDA_VISIBLE_DEVICES (one GPU per rank), or use --comm mpi"
    )]
    SelectGpu { index: usize, cause: String },

    // === Collectives ===
    #[error(
        "{call} failed: {message} (NCCL code {code}); rerun with NCCL_DEBUG=WARN to see why, \
         or use --comm mpi"
    )]
    NcclCall {
        call: &'static str,
        code: i32,
        message: String,
    },

    #[error(
        "{backend} collectives support floating-point tensors, not {kind:?}; this is a bug in \
         fsct-dist, please report it"
    )]
    NotFloat { backend: &'static str, kind: Kind },

    #[error(
        "NCCL tensors must be contiguous on {expected:?} (got {got:?}, contiguous {contiguous}); \
         this is a bug in fsct-dist, please report it"
    )]
    NotOnDevice {
        expected: Device,
        got: Device,
        contiguous: bool,
    },

    #[error(
        "copying a tensor to host memory for MPI failed: {cause}; check free host memory, or \
         use --comm nccl on GPUs"
    )]
    HostCopy { cause: String },
}
