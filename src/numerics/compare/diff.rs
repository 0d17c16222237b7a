//! How far one tensor is from another: the statistics Compare reports for
//! every tensor of every implementation, and the tolerance test shared by the
//! allclose verdicts and the hypothesis ranking.
//!
//! Everything is computed in float64 on the tensors' device; only scalars and
//! one value per channel come back to the host.

use tch::{Kind, Tensor};

use crate::numerics::{DType, NumericsError, TensorData};

/// `torch.testing.assert_close`'s tolerance: `|a - b| <= atol + rtol * |b|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Tolerance {
    /// `torch.testing.assert_close`'s defaults for `dtype` (PyTorch 2.11).
    pub fn default_for(dtype: DType) -> Self {
        let (rtol, atol) = match dtype {
            DType::Float32 => (1.3e-6, 1e-5),
            DType::Float64 => (1e-7, 1e-7),
            DType::Float16 => (1e-3, 1e-5),
            DType::BFloat16 => (1.6e-2, 1e-5),
        };
        Tolerance { rtol, atol }
    }
}

/// How a tensor `a` differs from a baseline `b` of the same shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// max |a - b|.
    pub max_abs_diff: f64,
    /// max |a - b| / |b| over the elements where b != 0 (0 when none).
    pub max_rel_diff: f64,
    /// Multi-index of the first element with the largest |a - b|.
    pub argmax_index: Vec<i64>,
    /// max |a - b| per channel: dimension 1 of (N, C, ...) tensors, the
    /// elements themselves for (C,) tensors.
    pub per_channel_max_abs_diff: Vec<f64>,
    /// Every element within the tolerance.
    pub allclose: bool,
    /// Elements outside the tolerance.
    pub mismatched_elements: i64,
}

/// Element-wise facts about `a` against `b`, both float64 and of one shape.
struct Elementwise {
    /// |a - b| with 0 where a == b or both NaN, +inf where exactly one is NaN.
    abs_diff: Tensor,
    /// a == b or both NaN: such elements always pass.
    same: Tensor,
    /// Both finite: only such elements are judged by the tolerance formula.
    both_finite: Tensor,
    /// |b|.
    magnitude: Tensor,
}

fn elementwise(a: &Tensor, b: &Tensor) -> Result<Elementwise, NumericsError> {
    let a = a.f_to_kind(Kind::Double)?;
    let b = b.f_to_kind(Kind::Double)?;
    let both_nan = a.f_isnan()?.f_logical_and(&b.f_isnan()?)?;
    let same = a.f_eq_tensor(&b)?.f_logical_or(&both_nan)?;
    let raw = a.f_sub(&b)?.f_abs()?;
    // NaN - x is NaN: a difference that exactly one NaN causes is infinite.
    let raw = raw.f_masked_fill(&raw.f_isnan()?, f64::INFINITY)?;
    let abs_diff = raw.f_masked_fill(&same, 0.0)?;
    let both_finite = a.f_isfinite()?.f_logical_and(&b.f_isfinite()?)?;
    Ok(Elementwise {
        abs_diff,
        same,
        both_finite,
        magnitude: b.f_abs()?,
    })
}

impl Elementwise {
    /// Elements within the tolerance, as `torch.isclose(equal_nan=True)`.
    fn close(&self, tolerance: Tolerance) -> Result<Tensor, NumericsError> {
        let allowed = self
            .magnitude
            .f_mul_scalar(tolerance.rtol)?
            .f_add_scalar(tolerance.atol)?;
        let within = self.abs_diff.f_le_tensor(&allowed)?;
        Ok(within
            .f_logical_and(&self.both_finite)?
            .f_logical_or(&self.same)?)
    }
}

/// The statistics of `actual` against `expected` (same shape, any dtypes).
/// The caller guarantees at least one element.
pub fn difference(
    actual: &Tensor,
    expected: &Tensor,
    tolerance: Tolerance,
) -> Result<Difference, NumericsError> {
    let facts = elementwise(actual, expected)?;
    let shape = facts.abs_diff.size();
    let max_abs_diff = facts.abs_diff.f_max()?.f_double_value(&[])?;
    let flat_argmax = facts
        .abs_diff
        .f_reshape([-1])?
        .f_argmax(0, false)?
        .f_int64_value(&[])?;
    // |a - b| / |b| is 0/0 only where |a - b| is 0 too, and x/0 where b == 0:
    // both are excluded by masking on b == 0.
    let relative = facts.abs_diff.f_div(&facts.magnitude)?;
    let relative = relative.f_masked_fill(&facts.magnitude.f_eq(0.0)?, 0.0)?;
    let relative = relative.f_masked_fill(&relative.f_isnan()?, f64::INFINITY)?;
    let max_rel_diff = relative.f_max()?.f_double_value(&[])?;
    let per_channel = if shape.len() >= 2 {
        let dims: Vec<i64> = (0..shape.len() as i64).filter(|&d| d != 1).collect();
        facts.abs_diff.f_amax(dims.as_slice(), false)?
    } else {
        facts.abs_diff.shallow_clone()
    };
    let mismatched_elements = facts
        .close(tolerance)?
        .f_logical_not()?
        .f_sum(Kind::Int64)?
        .f_int64_value(&[])?;
    Ok(Difference {
        max_abs_diff,
        max_rel_diff,
        argmax_index: unravel(flat_argmax, &shape),
        per_channel_max_abs_diff: to_f64_vec(&per_channel)?,
        allclose: mismatched_elements == 0,
        mismatched_elements,
    })
}

/// How many tolerances `actual` is away from `expected` at worst:
/// max |a - b| / (atol + rtol * |b|), 0 where equal or both NaN, +inf where
/// a non-finite value meets a different one. At most 1 exactly when every
/// element is within the tolerance.
pub fn tolerance_ratio(
    actual: &Tensor,
    expected: &Tensor,
    tolerance: Tolerance,
) -> Result<f64, NumericsError> {
    let facts = elementwise(actual, expected)?;
    let allowed = facts
        .magnitude
        .f_mul_scalar(tolerance.rtol)?
        .f_add_scalar(tolerance.atol)?;
    // A zero tolerance makes any difference infinitely many tolerances.
    let ratio = facts.abs_diff.f_div(&allowed)?;
    let ratio = ratio.f_masked_fill(&facts.both_finite.f_logical_not()?, f64::INFINITY)?;
    let ratio = ratio.f_masked_fill(&facts.same, 0.0)?;
    Ok(ratio.f_max()?.f_double_value(&[])?)
}

/// max |a - b| with [`difference`]'s NaN rules.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> Result<f64, NumericsError> {
    let facts = elementwise(actual, expected)?;
    Ok(facts.abs_diff.f_max()?.f_double_value(&[])?)
}

/// Row-major multi-index of flat position `flat` in `shape`.
fn unravel(mut flat: i64, shape: &[i64]) -> Vec<i64> {
    let mut index = vec![0; shape.len()];
    for (slot, &size) in index.iter_mut().zip(shape).rev() {
        if size > 0 {
            *slot = flat % size;
            flat /= size;
        }
    }
    index
}

fn to_f64_vec(tensor: &Tensor) -> Result<Vec<f64>, NumericsError> {
    Ok(TensorData::from_tensor(&tensor.f_to_kind(Kind::Double)?)?.to_f64_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(values: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).reshape(shape)
    }

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(0, &[2, 3, 4]), vec![0, 0, 0]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(13, &[2, 3, 4]), vec![1, 0, 1]);
        assert_eq!(unravel(4, &[5]), vec![4]);
    }

    #[test]
    fn nan_against_nan_is_equal_and_against_a_number_is_infinite() {
        let a = tensor(&[f64::NAN, f64::NAN, 1.0, f64::INFINITY], &[4]);
        let b = tensor(&[f64::NAN, 2.0, 1.0, f64::INFINITY], &[4]);
        let tolerance = Tolerance::default_for(DType::Float64);
        let diff = difference(&a, &b, tolerance).unwrap();
        assert_eq!(
            diff.per_channel_max_abs_diff,
            vec![0.0, f64::INFINITY, 0.0, 0.0]
        );
        assert_eq!(diff.argmax_index, vec![1]);
        assert_eq!(diff.mismatched_elements, 1);
        assert!(!diff.allclose);
        assert_eq!(tolerance_ratio(&a, &b, tolerance).unwrap(), f64::INFINITY);
    }

    #[test]
    fn relative_difference_skips_zero_baselines() {
        let a = tensor(&[1.0, 2.5, 0.5, 4.0], &[2, 2]);
        let b = tensor(&[0.0, 2.0, 0.5, 4.0], &[2, 2]);
        let diff = difference(
            &a,
            &b,
            Tolerance {
                rtol: 0.0,
                atol: 0.0,
            },
        )
        .unwrap();
        assert_eq!(diff.max_abs_diff, 1.0);
        assert_eq!(diff.max_rel_diff, 0.25);
        assert_eq!(diff.argmax_index, vec![0, 0]);
        assert_eq!(diff.per_channel_max_abs_diff, vec![1.0, 0.5]);
        assert_eq!(diff.mismatched_elements, 2);
    }

    #[test]
    fn tolerance_ratio_is_one_at_the_edge() {
        let a = tensor(&[1.5], &[1]);
        let b = tensor(&[1.0], &[1]);
        let ratio = tolerance_ratio(
            &a,
            &b,
            Tolerance {
                rtol: 0.25,
                atol: 0.25,
            },
        )
        .unwrap();
        assert_eq!(ratio, 1.0);
    }
}
