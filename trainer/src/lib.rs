//! What workers, the coordinator and re-execution share, so that all of them compute the
//! same numbers: the models, Fashion-MNIST loading, the batch schedule, flat parameter
//! vectors, the gradient step, the optimizers and the model export. Models are the image
//! CNN and MLP and a Llama-style transformer; data are image sets or token shards.

pub mod data;
pub mod export;
pub mod model;
pub mod optim;
pub mod reference;
pub mod runtime;
pub mod schedule;
pub mod step;
pub mod tokens;

pub use data::{DataError, Dataset, TrainData};
pub use model::{Architecture, LlamaConfig, ModelKind, ModelSpec, Net};
pub use optim::{Optimizer, OptimizerConfig, OptimizerKind};
pub use step::{evaluate, gradient, Evaluation, GradOutput};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A dataset could not be read or is malformed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A flat vector has the wrong length.
    #[error("expected {expected} values, got {got}")]
    Length {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    /// An index points outside the dataset.
    #[error("sample index {index} out of range (dataset has {len})")]
    Index {
        /// Offending index.
        index: u32,
        /// Dataset size.
        len: usize,
    },
    /// A window lies in a shard this worker has not loaded (yet).
    #[error("sample {index} needs shard {part}, which is not loaded")]
    Missing {
        /// The window.
        index: u32,
        /// Position of the shard in the manifest's training list.
        part: usize,
    },
    /// Writing a file failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Exporting the model failed.
    #[error("export: {0}")]
    Export(String),
    /// A weights file cannot be read into the model (it names the file and the tensor).
    #[error("{0}")]
    Weights(String),
}
