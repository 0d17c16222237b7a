//! Tables for people: aligned columns, one plain value per cell (lists joined
//! with ", ", maps as KEY=VALUE, enums by their proto names in a readable
//! case). Scripts use `--json` (json.rs) instead.

use std::io::{self, Write};

use crate::proto::v1 as pb;

/// A table printed with columns padded to their widest cell.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// A two-column FIELD / VALUE table.
    pub fn fields() -> Self {
        Table::new(&["FIELD", "VALUE"])
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn field(&mut self, name: &str, value: impl ToString) {
        self.rows.push(vec![name.to_owned(), value.to_string()]);
    }

    pub fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        for cells in std::iter::once(&self.header).chain(&self.rows) {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, &w)| format!("{c:<w$}"))
                .collect();
            writeln!(out, "{}", padded.join("  ").trim_end())?;
        }
        Ok(())
    }
}

/// An enum value's proto name without its type's prefix, lowercase:
/// `DATA_TYPE_FLOAT32` -> `float32`, `MODE_EVAL` -> `eval`. Values this
/// program does not know (a newer server) show as their number.
fn lower(name: Option<&str>, prefix: &str, number: i32) -> String {
    name.map_or_else(
        || number.to_string(),
        |name| name.strip_prefix(prefix).unwrap_or(name).to_lowercase(),
    )
}

/// A layer kind as PyTorch's class name, from the proto name:
/// `BATCH_NORM_2D` -> `BatchNorm2d`.
pub fn kind_name(kind: i32) -> String {
    match pb::BatchNormKind::try_from(kind) {
        Ok(kind) => kind
            .as_str_name()
            .split('_')
            .map(|word| {
                let lower = word.to_lowercase();
                let mut chars = lower.chars();
                chars.next().map_or_else(String::new, |first| {
                    first.to_uppercase().chain(chars).collect()
                })
            })
            .collect(),
        Err(_) => kind.to_string(),
    }
}

pub fn dtype_name(dtype: i32) -> String {
    let name = pb::DataType::try_from(dtype).ok();
    lower(name.map(|d| d.as_str_name()), "DATA_TYPE_", dtype)
}

fn mode_name(mode: i32) -> String {
    let name = pb::Mode::try_from(mode).ok();
    lower(name.map(|m| m.as_str_name()), "MODE_", mode)
}

fn implementation_name(implementation: i32) -> String {
    let name = pb::Implementation::try_from(implementation).ok();
    lower(
        name.map(|i| i.as_str_name()),
        "IMPLEMENTATION_",
        implementation,
    )
}

/// RFC 3339 in UTC, to the second; "-" when absent.
fn timestamp(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(
        || "-".to_owned(),
        |t| {
            let days = t.seconds.div_euclid(86_400);
            let secs = t.seconds.rem_euclid(86_400);
            let (y, m, d) = civil_from_days(days);
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                secs / 3600,
                secs % 3600 / 60,
                secs % 60
            )
        },
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// KEY=VALUE pairs sorted by key, joined with ",".
fn labels(config: &pb::SessionConfig) -> String {
    let mut pairs: Vec<String> = config
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    pairs.join(",")
}

/// Bytes as binary units (GiB), or "-" when unknown (0).
fn bytes(count: u64) -> String {
    if count == 0 {
        return "-".to_owned();
    }
    #[allow(clippy::cast_precision_loss)] // a displayed size, to 0.1 GiB
    let gib = count as f64 / f64::from(1u32 << 30);
    format!("{gib:.1} GiB")
}

/// `info`: one row per field, lists joined, one row per device.
pub fn server_info(info: &pb::GetServerInfoResponse) -> Table {
    let mut table = Table::fields();
    table.field("server_version", &info.server_version);
    table.field("libtorch_version", &info.libtorch_version);
    table.field("default_device", &info.default_device);
    table.field("cuda_device_count", info.cuda_device_count);
    for device in &info.devices {
        table.field(
            "devices",
            format!(
                "{}: {} (memory {})",
                device.name,
                device.description,
                bytes(device.total_memory_bytes)
            ),
        );
    }
    table.field("intra_op_threads", info.intra_op_threads);
    table.field("compute_threads", info.compute_threads);
    table.field("store", &info.store);
    table.field("sessions", info.sessions);
    table.field("unreadable_sessions", info.unreadable_sessions);
    table.field("features", info.features.join(", "));
    let limits = info.limits.unwrap_or_default();
    table.field("limits.max_sessions", limits.max_sessions);
    table.field("limits.max_tensor_elements", limits.max_tensor_elements);
    table.field("limits.max_num_features", limits.max_num_features);
    table.field("limits.max_message_bytes", limits.max_message_bytes);
    table
}

/// `sessions get`: one row per field.
pub fn session(session: &pb::Session) -> Table {
    let config = session.config.clone().unwrap_or_default();
    let mut table = Table::fields();
    table.field("session_id", &session.session_id);
    table.field("kind", kind_name(config.kind));
    table.field("num_features", config.num_features);
    table.field("eps", config.eps);
    let momentum = match config.momentum {
        _ if config.cumulative_average => "cumulative average".to_owned(),
        Some(momentum) => momentum.to_string(),
        None => "-".to_owned(),
    };
    table.field("momentum", momentum);
    table.field("affine", config.affine);
    table.field("track_running_stats", config.track_running_stats);
    table.field("param_dtype", dtype_name(config.param_dtype));
    table.field("default_mode", mode_name(config.default_mode));
    table.field("reject_non_finite", config.reject_non_finite);
    table.field("device", &session.device);
    table.field("version", session.version);
    table.field("num_batches_tracked", session.num_batches_tracked);
    table.field("created_at", timestamp(session.created_at.as_ref()));
    table.field("updated_at", timestamp(session.updated_at.as_ref()));
    table.field("last_used_at", timestamp(session.last_used_at.as_ref()));
    table.field("labels", labels(&config));
    table
}

/// `sessions list`: one row per session.
pub fn sessions(sessions: &[pb::Session]) -> Table {
    let mut table = Table::new(&[
        "SESSION", "KIND", "FEATURES", "DTYPE", "DEVICE", "VERSION", "BATCHES", "UPDATED", "LABELS",
    ]);
    for session in sessions {
        let config = session.config.clone().unwrap_or_default();
        table.row(vec![
            session.session_id.clone(),
            kind_name(config.kind),
            config.num_features.to_string(),
            dtype_name(config.param_dtype),
            session.device.clone(),
            session.version.to_string(),
            session.num_batches_tracked.to_string(),
            timestamp(session.updated_at.as_ref()),
            labels(&config),
        ]);
    }
    table
}

fn parts(report: &pb::ImplementationReport) -> Vec<(&'static str, &pb::TensorReport)> {
    [
        ("output", &report.output),
        ("running_mean", &report.running_mean),
        ("running_var", &report.running_var),
        ("grad_input", &report.grad_input),
        ("grad_weight", &report.grad_weight),
        ("grad_bias", &report.grad_bias),
    ]
    .into_iter()
    .filter_map(|(name, part)| part.as_ref().map(|p| (name, p)))
    .collect()
}

/// `compare`: the differences per implementation and tensor, then the
/// diagnosis when a candidate was sent.
pub fn print_comparison(out: &mut impl Write, reply: &pb::CompareResponse) -> io::Result<()> {
    writeln!(
        out,
        "Compare on {} (rtol {:e}, atol {:e}); differences are max |a - b|",
        reply.device, reply.rtol, reply.atol
    )?;
    let mut table = Table::new(&[
        "IMPLEMENTATION",
        "PART",
        "VS FLOAT64",
        "VS REFERENCE",
        "ALLCLOSE",
    ]);
    for report in &reply.reports {
        for (name, part) in parts(report) {
            let cell = |d: &Option<pb::Difference>| {
                d.as_ref()
                    .map_or("-".to_owned(), |d| format!("{:.3e}", d.max_abs_diff))
            };
            let close = part
                .vs_reference
                .as_ref()
                .or(part.vs_float64_reference.as_ref())
                .map_or("-", |d| if d.allclose { "yes" } else { "NO" });
            table.row(vec![
                implementation_name(report.implementation),
                name.to_owned(),
                cell(&part.vs_float64_reference),
                cell(&part.vs_reference),
                close.to_owned(),
            ]);
        }
    }
    table.print(out)?;
    let Some(diagnosis) = &reply.diagnosis else {
        return Ok(());
    };
    writeln!(out, "\nDiagnosis: {}", diagnosis.summary)?;
    for hypothesis in diagnosis.hypotheses.iter().filter(|h| h.explains) {
        writeln!(out, "  * {}: {}", hypothesis.name, hypothesis.explanation)?;
        if !hypothesis.fix.is_empty() {
            writeln!(out, "    fix: {}", hypothesis.fix)?;
        }
    }
    for ambiguity in &diagnosis.ambiguities {
        writeln!(out, "  ? {ambiguity}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn enum_values_read_as_pytorch_names() {
        assert_eq!(
            kind_name(pb::BatchNormKind::BatchNorm2d as i32),
            "BatchNorm2d"
        );
        assert_eq!(kind_name(99), "99");
        assert_eq!(dtype_name(pb::DataType::Bfloat16 as i32), "bfloat16");
        assert_eq!(mode_name(pb::Mode::Eval as i32), "eval");
        assert_eq!(
            implementation_name(pb::Implementation::Float64Reference as i32),
            "float64_reference"
        );
    }
}
