//! Request validation: session ids (as users and admins name them), labels,
//! request ids, the enum fields, momentum, and whole CreateSession and
//! Compare requests as `transport::convert` decodes them.
//!
//! Rules (batch_norm.proto, compare.proto, `session::id`, `session::mod`,
//! `numerics::batch_norm`): a session name is 1 to 128 bytes of
//! `[A-Za-z0-9._-]`, an admin may also name `tenant/name` with a tenant of 1
//! to 64 such bytes; at most 64 labels, keys 1 to 128 bytes, values at most
//! 1024 bytes; request ids at most 128 bytes ("" is none); enum fields hold
//! one of their declared values (UNSPECIFIED means the default where the
//! field is optional, and is refused for `kind`); momentum and
//! cumulative_average exclude each other; rtol and atol come together; eps
//! must be finite and > 0 and momentum finite when the registry or Compare
//! validates them. Every rejection is INVALID_ARGUMENT (RESOURCE_EXHAUSTED
//! for a tensor over the element limit).

use std::collections::{BTreeMap, HashMap};

use normserve::auth::{Principal, Role};
use normserve::numerics::batch_norm::{check_eps, check_momentum};
use normserve::numerics::compare::{self, Implementation};
use normserve::numerics::{DType, LayerKind, Momentum};
use normserve::proto::v1 as pb;
use normserve::session::{check_labels, parse_request_id, Mode};
use normserve::transport::convert;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use tonic::Code;

use crate::tensors::{self, Expected};
use crate::{code, fuzz};

fn is_name(text: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Strings near and far from the id alphabet: valid names, names with a
/// slash, lengths around the limits, control characters, any Unicode.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9._-]{1,130}",
        2 => "[A-Za-z0-9._-]{0,66}/[A-Za-z0-9._/-]{0,130}",
        1 => "[A-Za-z0-9._ /\\\\:\\x00-\\x1f]{0,20}",
        2 => any::<String>(),
        1 => "\\PC{0,40}",
        1 => Just(String::new()),
    ]
}

fn principal() -> impl Strategy<Value = Principal> {
    let tenant = prop_oneof![Just(String::new()), "[A-Za-z0-9._-]{1,64}"];
    let role = prop_oneof![Just(Role::User), Just(Role::Admin)];
    (tenant, role).prop_map(|(tenant, role)| Principal { tenant, role })
}

fn check_session_id(principal: &Principal, text: &str) -> TestCaseResult {
    let admin_key = match text.split_once('/') {
        None => is_name(text, 128),
        Some((tenant, name)) => is_name(tenant, 64) && is_name(name, 128),
    };
    let valid = if principal.is_admin() {
        admin_key
    } else {
        is_name(text, 128)
    };
    match convert::session_id(principal, text) {
        Ok(id) => {
            prop_assert!(valid, "accepted {text:?}");
            if principal.is_admin() {
                prop_assert_eq!(id.as_str(), text);
            } else {
                prop_assert_eq!(id.name(), text);
                prop_assert_eq!(id.tenant(), principal.tenant.as_str());
                prop_assert!(id.belongs_to(&principal.tenant));
            }
            prop_assert_eq!(convert::shown_session_id(principal, &id), text);
        }
        Err(error) => {
            prop_assert!(!valid, "rejected {text:?}: {error}");
            prop_assert_eq!(code(error), Code::InvalidArgument);
        }
    }
    match convert::optional_session_id(principal, text) {
        Ok(None) => prop_assert!(text.is_empty()),
        Ok(Some(_)) => prop_assert!(valid),
        Err(_) => prop_assert!(!valid && !text.is_empty()),
    }
    Ok(())
}

#[test]
fn session_ids_are_names_of_the_documented_alphabet() {
    fuzz("session_ids", (principal(), text()), |(principal, text)| {
        check_session_id(&principal, &text)
    });
}

#[test]
fn request_ids_are_at_most_128_bytes() {
    fuzz("request_ids", text(), |text| {
        match parse_request_id(&text) {
            Ok(None) => prop_assert!(text.is_empty()),
            Ok(Some(id)) => {
                prop_assert!(text.len() <= 128);
                prop_assert_eq!(id, text);
            }
            Err(error) => {
                prop_assert!(text.len() > 128, "{error}");
                prop_assert_eq!(code(error), Code::InvalidArgument);
            }
        }
        Ok(())
    });
}

fn label_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z./-]{1,12}",
        1 => Just(String::new()),
        1 => "\\PC{1,40}",
        1 => "[a-z]{126,130}",
        1 => "é{62,66}", // two bytes a character: around 128 bytes
    ]
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,20}",
        1 => "[a-z]{1020,1030}",
        1 => any::<String>(),
    ]
}

pub fn labels() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        4 => prop::collection::hash_map(label_key(), label_value(), 0..6),
        1 => prop::collection::hash_map("[a-z]{1,8}", "[a-z]{0,4}", 60..70),
    ]
}

fn labels_valid(labels: &BTreeMap<String, String>) -> bool {
    labels.len() <= 64
        && labels
            .iter()
            .all(|(k, v)| (1..=128).contains(&k.len()) && v.len() <= 1024)
}

#[test]
fn labels_keep_to_the_documented_limits() {
    fuzz("labels", labels(), |labels| {
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        match check_labels(&labels) {
            Ok(()) => prop_assert!(labels_valid(&labels)),
            Err(error) => {
                prop_assert!(!labels_valid(&labels), "{error}");
                prop_assert_eq!(code(error), Code::InvalidArgument);
            }
        }
        Ok(())
    });
}

/// Enum values: mostly declared ones, sometimes anything.
fn enum_value(declared: i32) -> impl Strategy<Value = i32> {
    prop_oneof![6 => 0..=declared, 1 => any::<i32>()]
}

/// Floats where eps and momentum go wrong: zero, negative, NaN, infinities,
/// subnormals, and ordinary values.
pub fn scalar() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 1e-12f64..1.0,
        2 => crate::tensors::double(),
        1 => prop::sample::select(vec![0.0, -0.0, -1e-5, 5e-324, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.0, 2.0]),
    ]
}

#[test]
fn enums_decode_to_their_declared_values() {
    fuzz("enums", any::<i32>(), |value| {
        let kind = convert::layer_kind(value);
        match value {
            1 => prop_assert!(matches!(kind, Ok(LayerKind::BatchNorm1d))),
            2 => prop_assert!(matches!(kind, Ok(LayerKind::BatchNorm2d))),
            3 => prop_assert!(matches!(kind, Ok(LayerKind::BatchNorm3d))),
            _ => prop_assert_eq!(kind.map(|_| ()).map_err(code), Err(Code::InvalidArgument)),
        }
        let mode = convert::mode(value);
        match value {
            0 => prop_assert!(matches!(mode, Ok(None))),
            1 => prop_assert!(matches!(mode, Ok(Some(Mode::Train)))),
            2 => prop_assert!(matches!(mode, Ok(Some(Mode::Eval)))),
            _ => prop_assert_eq!(mode.map(|_| ()).map_err(code), Err(Code::InvalidArgument)),
        }
        Ok(())
    });
}

#[test]
fn momentum_and_cumulative_average_exclude_each_other() {
    fuzz(
        "momentum",
        (proptest::option::of(scalar()), any::<bool>()),
        |(value, cumulative)| {
            match (convert::momentum(value, cumulative), value, cumulative) {
                (Ok(None), None, false) => {}
                (Ok(Some(Momentum::CumulativeAverage)), None, true) => {}
                (Ok(Some(Momentum::Exponential(m))), Some(v), false) => {
                    prop_assert_eq!(m.to_bits(), v.to_bits())
                }
                (Err(error), Some(_), true) => {
                    prop_assert_eq!(code(error), Code::InvalidArgument)
                }
                (other, _, _) => prop_assert!(false, "momentum gave {other:?}"),
            }
            Ok(())
        },
    );
}

fn dtype_named(value: i32) -> Option<DType> {
    match value {
        1 => Some(DType::Float32),
        2 => Some(DType::Float64),
        3 => Some(DType::Float16),
        4 => Some(DType::BFloat16),
        _ => None,
    }
}

pub fn create_session_request() -> impl Strategy<Value = pb::CreateSessionRequest> {
    let num_features = prop_oneof![4 => 1i64..=64, 1 => any::<i64>(), 1 => -2i64..=0];
    let scalars = (
        proptest::option::of(scalar()),
        proptest::option::of(scalar()),
        any::<bool>(),
    );
    let flags = (
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        any::<bool>(),
    );
    let enums = (enum_value(3), enum_value(4), enum_value(2));
    (text(), num_features, scalars, flags, enums, labels()).prop_map(
        |(session_id, num_features, (eps, momentum, cumulative), flags, enums, labels)| {
            let (affine, track_running_stats, reject_non_finite) = flags;
            let (kind, param_dtype, default_mode) = enums;
            pb::CreateSessionRequest {
                session_id,
                kind,
                num_features,
                eps,
                momentum,
                cumulative_average: cumulative,
                affine,
                track_running_stats,
                param_dtype,
                default_mode,
                reject_non_finite,
                labels,
                ..Default::default()
            }
        },
    )
}

fn check_session_config(request: &pb::CreateSessionRequest) -> TestCaseResult {
    let decodable = (1..=3).contains(&request.kind)
        && (0..=4).contains(&request.param_dtype)
        && (0..=2).contains(&request.default_mode)
        && !(request.momentum.is_some() && request.cumulative_average);
    let config = match convert::session_config(request) {
        Ok(config) => config,
        Err(error) => {
            prop_assert!(!decodable, "rejected: {error}");
            prop_assert_eq!(code(error), Code::InvalidArgument);
            return Ok(());
        }
    };
    prop_assert!(decodable, "accepted {request:?}");
    let kind = match request.kind {
        1 => LayerKind::BatchNorm1d,
        2 => LayerKind::BatchNorm2d,
        _ => LayerKind::BatchNorm3d,
    };
    prop_assert_eq!(config.kind, kind);
    prop_assert_eq!(config.num_features, request.num_features);
    prop_assert_eq!(config.eps.to_bits(), request.eps.unwrap_or(1e-5).to_bits());
    let momentum = match (request.momentum, request.cumulative_average) {
        (Some(m), _) => Momentum::Exponential(m),
        (None, true) => Momentum::CumulativeAverage,
        (None, false) => Momentum::Exponential(0.1),
    };
    match (config.momentum, momentum) {
        (Momentum::Exponential(a), Momentum::Exponential(b)) => {
            prop_assert_eq!(a.to_bits(), b.to_bits())
        }
        (a, b) => prop_assert_eq!(a, b),
    }
    prop_assert_eq!(config.affine, request.affine.unwrap_or(true));
    prop_assert_eq!(
        config.track_running_stats,
        request.track_running_stats.unwrap_or(true)
    );
    prop_assert_eq!(
        config.param_dtype,
        dtype_named(request.param_dtype).unwrap_or(DType::Float32)
    );
    let mode = if request.default_mode == 2 {
        Mode::Eval
    } else {
        Mode::Train
    };
    prop_assert_eq!(config.default_mode, mode);
    prop_assert_eq!(config.reject_non_finite, request.reject_non_finite);
    let labels: BTreeMap<String, String> = request.labels.clone().into_iter().collect();
    prop_assert_eq!(&config.labels, &labels);

    // What the registry then requires of the decoded values: eps finite and
    // positive, momentum finite, labels within limits, each refusal
    // INVALID_ARGUMENT.
    let eps_ok = config.eps.is_finite() && config.eps > 0.0;
    match check_eps("eps", config.eps) {
        Ok(()) => prop_assert!(eps_ok, "eps {} accepted", config.eps),
        Err(error) => {
            prop_assert!(!eps_ok, "eps {} refused", config.eps);
            prop_assert_eq!(code(error), Code::InvalidArgument);
        }
    }
    if let Momentum::Exponential(m) = config.momentum {
        match check_momentum("momentum", m) {
            Ok(()) => prop_assert!(m.is_finite()),
            Err(error) => {
                prop_assert!(!m.is_finite());
                prop_assert_eq!(code(error), Code::InvalidArgument);
            }
        }
    }
    prop_assert_eq!(check_labels(&config.labels).is_ok(), labels_valid(&labels));
    Ok(())
}

#[test]
fn create_session_requests_decode_with_their_defaults_or_are_refused() {
    fuzz("session_config", create_session_request(), |request| {
        check_session_config(&request)
    });
}

fn small_tensor(
    rank: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Option<tensors::Case>> {
    proptest::option::weighted(0.5, tensors::case_with_rank(rank))
}

#[derive(Debug, Clone)]
pub struct CompareCase {
    pub input: Option<tensors::Case>,
    /// weight, bias, running_mean, running_var, grad_output.
    pub tensors: Vec<Option<tensors::Case>>,
    /// Present: a candidate with these parts (output .. grad_bias).
    pub candidate: Option<Vec<Option<tensors::Case>>>,
    pub scalars: (Option<f64>, Option<f64>, bool, Option<f64>, Option<f64>),
    pub implementations: Vec<i32>,
    pub num_batches_tracked: i64,
    pub training: bool,
}

impl CompareCase {
    pub fn to_proto(&self) -> pb::CompareRequest {
        let t = |case: &Option<tensors::Case>| case.as_ref().map(tensors::Case::to_proto);
        let (eps, momentum, cumulative_average, rtol, atol) = self.scalars;
        pb::CompareRequest {
            input: t(&self.input),
            weight: t(&self.tensors[0]),
            bias: t(&self.tensors[1]),
            running_mean: t(&self.tensors[2]),
            running_var: t(&self.tensors[3]),
            grad_output: t(&self.tensors[4]),
            candidate: self.candidate.as_ref().map(|parts| pb::Candidate {
                output: t(&parts[0]),
                running_mean: t(&parts[1]),
                running_var: t(&parts[2]),
                grad_input: t(&parts[3]),
                grad_weight: t(&parts[4]),
                grad_bias: t(&parts[5]),
            }),
            num_batches_tracked: self.num_batches_tracked,
            training: self.training,
            eps,
            momentum,
            cumulative_average,
            rtol,
            atol,
            implementations: self.implementations.clone(),
            return_tensors: true,
            device: String::new(),
        }
    }
}

pub fn compare_case() -> impl Strategy<Value = CompareCase> {
    let input = proptest::option::weighted(0.9, tensors::case_with_rank(0..=6));
    let tensors = prop::collection::vec(small_tensor(0..=2), 5);
    let candidate = proptest::option::of(prop::collection::vec(small_tensor(0..=5), 6));
    let scalars = (
        proptest::option::of(scalar()),
        proptest::option::of(scalar()),
        any::<bool>(),
        proptest::option::of(scalar()),
        proptest::option::of(scalar()),
    );
    let implementations = prop::collection::vec(enum_value(6), 0..4);
    (
        input,
        tensors,
        candidate,
        scalars,
        implementations,
        any::<i64>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                input,
                tensors,
                candidate,
                scalars,
                implementations,
                num_batches_tracked,
                training,
            )| {
                CompareCase {
                    input,
                    tensors,
                    candidate,
                    scalars,
                    implementations,
                    num_batches_tracked,
                    training,
                }
            },
        )
}

fn check_compare_request(case: &CompareCase, max_elements: u64) -> TestCaseResult {
    let (eps, momentum, cumulative, rtol, atol) = case.scalars;
    let all_tensors = case
        .tensors
        .iter()
        .chain(case.candidate.iter().flatten())
        .chain(std::iter::once(&case.input));
    // Every tensor decodable by the rules, none on the overflow edge.
    let tensors_ok = all_tensors
        .flatten()
        .all(|t| matches!(tensors::expected(t, max_elements), Expected::Accept(_)));
    let implementations_ok = case.implementations.iter().all(|&i| (1..=5).contains(&i));
    let valid = case.input.is_some()
        && tensors_ok
        && !(momentum.is_some() && cumulative)
        && rtol.is_some() == atol.is_some()
        && implementations_ok;
    match convert::compare_request(case.to_proto(), max_elements) {
        Ok((request, _)) => {
            prop_assert!(valid, "accepted {case:?}");
            let input = case.input.as_ref().unwrap();
            prop_assert_eq!(request.input.shape(), &input.shape[..]);
            prop_assert_eq!(request.eps.to_bits(), eps.unwrap_or(1e-5).to_bits());
            prop_assert_eq!(request.tolerance.is_some(), rtol.is_some());
            prop_assert_eq!(request.implementations.len(), case.implementations.len());
            for (&value, &implementation) in
                case.implementations.iter().zip(&request.implementations)
            {
                let want = match value {
                    1 => Implementation::Reference,
                    2 => Implementation::Float64Reference,
                    3 => Implementation::ManualBiased,
                    4 => Implementation::ManualUnbiased,
                    _ => Implementation::Candidate,
                };
                prop_assert_eq!(implementation, want);
            }
            prop_assert_eq!(request.candidate.is_some(), case.candidate.is_some());
            prop_assert_eq!(request.num_batches_tracked, case.num_batches_tracked);
        }
        Err(error) => {
            prop_assert!(!valid, "rejected: {error}");
            let got = code(error);
            prop_assert!(
                got == Code::InvalidArgument || got == Code::ResourceExhausted,
                "rejected with {got:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn compare_requests_decode_or_are_refused_cleanly() {
    fuzz(
        "compare_request",
        (compare_case(), tensors::max_elements()),
        |(case, max)| check_compare_request(&case, max),
    );
}

/// A SessionError a property can hold on to.
pub fn is_client_error(error: impl Into<tonic::Status>) -> bool {
    matches!(code(error), Code::InvalidArgument | Code::ResourceExhausted)
}

/// A tensor of `shape` in `form`: raw bytes of DataType 1 to 4, or
/// float_values (5) or double_values (6).
fn tensor_of(shape: Vec<i64>, form: i32) -> impl Strategy<Value = tensors::Case> {
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
        .filter(|&n| n <= 4096)
        .unwrap_or(0);
    let values = match form {
        5 => prop::collection::vec(tensors::float(), numel)
            .prop_map(tensors::Values::Float)
            .boxed(),
        6 => prop::collection::vec(tensors::double(), numel)
            .prop_map(tensors::Values::Double)
            .boxed(),
        dtype => {
            let size = match dtype {
                2 => 8,
                3 | 4 => 2,
                _ => 4,
            };
            prop::collection::vec(any::<u8>(), numel * size)
                .prop_map(|bytes| tensors::Values::Raw { bytes, offset: 0 })
                .boxed()
        }
    };
    let dtype = if form <= 4 { form } else { 0 };
    values.prop_map(move |values| tensors::Case {
        dtype,
        shape: shape.clone(),
        values,
    })
}

/// Compare requests that mostly pass decoding: (N, C, *spatial) inputs,
/// (C,) parameters of one dtype (sometimes of another size or dtype),
/// outputs of the input's shape; dimensions small, sometimes zero, rarely
/// huge.
fn computable_compare_case() -> impl Strategy<Value = CompareCase> {
    let dim = prop_oneof![
        30 => 1i64..=3,
        3 => Just(0i64),
        1 => Just(1i64 << 40),
        1 => Just(1i64 << 62),
    ];
    let forms = (
        1i32..=6,
        prop_oneof![3 => Just(None), 1 => (1i32..=6).prop_map(Some)],
    );
    (
        prop::collection::vec(dim, 2..=5),
        forms,
        any::<[bool; 8]>(),
        0i64..=4,
    )
        .prop_flat_map(|(shape, (form, param_form), present, other_c)| {
            let c = shape[1];
            let param_form = param_form.unwrap_or(form);
            let per_channel = move |p: bool| {
                let size = if present[7] { other_c } else { c };
                proptest::option::weighted(
                    if p { 0.95 } else { 0.05 },
                    tensor_of(vec![size], param_form),
                )
            };
            let like_input = |p: f64| proptest::option::weighted(p, tensor_of(shape.clone(), form));
            // running_mean and running_var come together (mostly).
            let stats = present[2] || present[3];
            let tensors = (
                per_channel(present[0]),
                per_channel(present[1]),
                per_channel(stats),
                per_channel(stats),
                like_input(0.3),
            )
                .prop_map(|(w, b, m, v, g)| vec![w, b, m, v, g]);
            let candidate = proptest::option::weighted(
                0.4,
                (like_input(0.9), per_channel(stats), per_channel(stats))
                    .prop_map(|(o, m, v)| vec![o, m, v, None, None, None]),
            );
            let scalars = (
                proptest::option::of(scalar()),
                proptest::option::weighted(0.3, scalar()),
                any::<bool>(),
                proptest::option::weighted(0.2, (0.0f64..1.0, 0.0f64..1.0)),
            )
                .prop_map(|(eps, m, cumulative, tolerance)| {
                    (
                        eps,
                        m,
                        cumulative && m.is_none(),
                        tolerance.map(|t| t.0),
                        tolerance.map(|t| t.1),
                    )
                });
            (
                tensor_of(shape.clone(), form),
                tensors,
                candidate,
                scalars,
                prop::collection::vec(1i32..=5, 0..3),
                prop_oneof![9 => 0i64..=3, 1 => any::<i64>()],
                any::<bool>(),
            )
                .prop_map(
                    |(
                        input,
                        tensors,
                        candidate,
                        scalars,
                        implementations,
                        num_batches_tracked,
                        training,
                    )| {
                        CompareCase {
                            input: Some(input),
                            tensors,
                            candidate,
                            scalars,
                            implementations,
                            num_batches_tracked,
                            training,
                        }
                    },
                )
        })
}

#[test]
fn compare_refuses_what_libtorch_would_fail_on() {
    fuzz("compare_compute", computable_compare_case(), |case| {
        let Ok((request, _)) = convert::compare_request(case.to_proto(), 1 << 20) else {
            return Ok(());
        };
        match compare::compare(request, tch::Device::Cpu, 64) {
            Ok(comparison) => prop_assert!(!comparison.reports.is_empty()),
            Err(error) => {
                let text = error.to_string();
                let got = code(error);
                prop_assert!(
                    got == Code::InvalidArgument || got == Code::ResourceExhausted,
                    "{got:?}: {text}"
                );
            }
        }
        Ok(())
    });
}
