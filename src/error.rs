//! One error type for the whole crate.
//!
//! Every variant carries the numbers that caused it: which row, which column, what value. Input
//! errors are reported per row inside a [`crate::Forward`] (see [`crate::RowReport::error`]), so a
//! bad row never costs the good rows their results; errors about the call itself (shapes, ε, the
//! device) are returned as `Err`.

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A NaN anywhere, or +∞ in largest mode (−∞ in smallest mode), in a valid entry.
    #[error("row {row}, column {col}: score {value} is not allowed ({why})")]
    NonFiniteInput {
        row: usize,
        col: usize,
        value: f64,
        why: &'static str,
    },

    /// k larger than the row length n (k counts all n entries, valid or not).
    #[error("row {row}: k = {k} is out of range for a row of n = {n} entries")]
    KOutOfRange { row: usize, k: usize, n: usize },

    /// ε not finite or not strictly positive.
    #[error("epsilon = {epsilon} must be finite and greater than 0")]
    EpsNotPositive { epsilon: f64 },

    /// A batch whose rows have no entries at all (n = 0).
    #[error("the rows are empty (n = 0); a row needs at least one entry")]
    EmptyInput,

    /// A buffer whose length does not fit the batch.
    #[error("{what}: expected {expected} values, got {actual}")]
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },

    /// An option that this operator or backend cannot take.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// No GPU adapter could be found or opened.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// The problem does not fit the device, even split into parts.
    #[error("too large for the device: {0}")]
    TooLarge(String),

    /// The device reported an error (validation, out of memory, lost device).
    /// [`crate::gpu::GpuBackend::needs_rebuild`] says whether the backend can still be used;
    /// [`crate::GpuSoftTopK::fall_back_on_device_error`] answers such calls on the CPU.
    #[error("GPU error ({kind}): {message}")]
    Gpu { kind: GpuErrorKind, message: String },
}

/// What kind of device failure a [`Error::Gpu`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuErrorKind {
    Validation,
    OutOfMemory,
    DeviceLost,
    Internal,
}

impl std::fmt::Display for GpuErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            GpuErrorKind::Validation => "validation",
            GpuErrorKind::OutOfMemory => "out of memory",
            GpuErrorKind::DeviceLost => "device lost",
            GpuErrorKind::Internal => "internal",
        };
        f.write_str(name)
    }
}

impl Error {
    /// A short stable name for the kind of error, as the command-line tool prints it.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NonFiniteInput { .. } => "non_finite_input",
            Error::KOutOfRange { .. } => "k_out_of_range",
            Error::EpsNotPositive { .. } => "eps_not_positive",
            Error::EmptyInput => "empty_input",
            Error::ShapeMismatch { .. } => "shape_mismatch",
            Error::InvalidOption(_) => "invalid_option",
            Error::NoAdapter(_) => "no_adapter",
            Error::TooLarge(_) => "too_large",
            Error::Gpu { .. } => "gpu",
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
