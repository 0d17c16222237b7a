//! What a session holds in memory, as a function of its configuration alone:
//! the bytes the memory budget charges it (as session state) from the moment
//! it is created, imported or loaded from the store until it is deleted or
//! evicted. A function of the configuration, not of the tensors present,
//! so that the charge is known before anything is allocated and never
//! changes while the session lives (ImportState and UpdateParameters replace
//! tensors of the same shapes and dtype).
//!
//! A mode that keeps more per channel adds its bytes here, and every place
//! that charges a session follows: exact-statistics sessions are charged
//! their sums at the most they can grow to.

use super::SessionConfig;

/// What an exact-statistics session keeps per channel at most: the digits
/// of its sums of positive values, of negative values (68 u64 digits each)
/// and of squares (134), their vector headers, and the rounded statistics.
/// Sums of values of ordinary magnitude use far fewer digits; the charge is
/// the bound, so that it never has to grow while the session lives.
pub const EXACT_BYTES_PER_CHANNEL: u64 = (68 + 68 + 134) * 8 + 3 * 24 + 24;

/// What every session holds beside its tensors: its facts and configuration,
/// the state behind its lock, the request ids of its replay window, and
/// libtorch's tensor headers and storages (about half a KiB each).
pub const SESSION_OVERHEAD_BYTES: u64 = 8 * 1024;

/// Bytes a session of `config` holds: the (C,) tensors its configuration
/// gives it (weight and bias when affine, running mean and variance when it
/// tracks running statistics), each `num_features` elements of
/// `param_dtype`, its labels, [`SESSION_OVERHEAD_BYTES`], and for exact
/// statistics [`EXACT_BYTES_PER_CHANNEL`] per channel.
pub fn resident_bytes(config: &SessionConfig) -> u64 {
    let channels = u64::try_from(config.num_features).unwrap_or(0);
    let tensors = 2 * u64::from(config.affine) + 2 * u64::from(config.track_running_stats);
    let itemsize = config.param_dtype.itemsize() as u64;
    let labels: usize = config.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    let exact = if config.exact_statistics {
        channels.saturating_mul(EXACT_BYTES_PER_CHANNEL)
    } else {
        0
    };
    SESSION_OVERHEAD_BYTES
        .saturating_add(channels.saturating_mul(itemsize).saturating_mul(tensors))
        .saturating_add(labels as u64)
        .saturating_add(exact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::{DType, LayerKind, Momentum};
    use crate::session::Mode;

    fn config(num_features: i64, affine: bool, track: bool, dtype: DType) -> SessionConfig {
        SessionConfig {
            kind: LayerKind::BatchNorm1d,
            num_features,
            eps: 1e-5,
            momentum: Momentum::Exponential(0.1),
            affine,
            track_running_stats: track,
            param_dtype: dtype,
            default_mode: Mode::Train,
            reject_non_finite: false,
            labels: [("team".to_owned(), "vision".to_owned())].into(),
            exact_statistics: false,
            step_timeout: crate::session::DEFAULT_STEP_TIMEOUT,
        }
    }

    #[test]
    fn a_session_is_charged_dtype_times_features_times_its_tensors() {
        let overhead = SESSION_OVERHEAD_BYTES + 10;
        // 65536 float64 channels, four tensors: 2 MiB.
        let big = config(65_536, true, true, DType::Float64);
        assert_eq!(resident_bytes(&big), 65_536 * 8 * 4 + overhead);
        let no_stats = config(100, true, false, DType::Float16);
        assert_eq!(resident_bytes(&no_stats), 100 * 2 * 2 + overhead);
        let nothing = config(100, false, false, DType::Float32);
        assert_eq!(resident_bytes(&nothing), overhead);
        // Exact statistics: the sums' most digits, 2,256 bytes a channel.
        let exact = SessionConfig {
            exact_statistics: true,
            ..config(100, false, true, DType::Float32)
        };
        assert_eq!(resident_bytes(&exact), 100 * 4 * 2 + 100 * 2_256 + overhead);
    }
}
