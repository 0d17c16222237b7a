//! The operator command line lives in the `normserve-ctl` crate, which cannot
//! see this crate's generated types (it is built without libtorch, and this
//! crate depends on it, not the reverse). What stays here is its `.npy`
//! reader yielding this crate's `proto::v1::Tensor`, for code that hands the
//! tensor to `transport::convert` (the `.npy` fuzz target).

/// `.npy` files as this crate's wire tensors.
pub mod npy {
    use prost::Message;

    use crate::proto::v1 as pb;

    /// Parses the bytes of a `.npy` file (`normserve_ctl::npy::parse`). Both
    /// crates generate `Tensor` from the same `proto/`, so re-reading the
    /// encoded message is exact.
    pub fn parse(data: &[u8]) -> Result<pb::Tensor, String> {
        let tensor = normserve_ctl::npy::parse(data)?;
        pb::Tensor::decode(tensor.encode_to_vec().as_slice()).map_err(|e| e.to_string())
    }
}
