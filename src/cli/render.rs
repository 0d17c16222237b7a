//! Output of the command line: aligned tables for people, JSON for scripts.

use serde_json::{json, Value};

use crate::numerics::{DType, LayerKind};
use crate::proto::v1 as pb;
use crate::transport::convert;

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

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, &w)| format!("{c:<w$}"))
                .collect();
            println!("{}", padded.join("  ").trim_end());
        };
        line(&self.header);
        for row in &self.rows {
            line(row);
        }
    }
}

pub fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("normserve: cannot print JSON: {e}"),
    }
}

/// A JSON value as one table cell.
pub fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn timestamp(ts: &Option<prost_types::Timestamp>) -> Value {
    ts.as_ref().map_or(Value::Null, |t| {
        let seconds = t.seconds;
        // RFC 3339 in UTC from the civil date of `seconds`.
        let days = seconds.div_euclid(86_400);
        let secs = seconds.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        Value::String(format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        ))
    })
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

fn kind_name(kind: i32) -> &'static str {
    pb::BatchNormKind::try_from(kind)
        .ok()
        .and_then(convert::layer_kind_from_proto)
        .map_or("unknown", LayerKind::module_name)
}

fn dtype_name(dtype: i32) -> &'static str {
    pb::DataType::try_from(dtype)
        .ok()
        .and_then(convert::dtype_from_proto)
        .map_or("unspecified", DType::name)
}

fn labels(config: &pb::SessionConfig) -> String {
    let mut pairs: Vec<String> = config
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    pairs.join(",")
}

pub fn session(session: &pb::Session) -> Value {
    let config = session.config.clone().unwrap_or_default();
    let mut labels: Vec<(&String, &String)> = config.labels.iter().collect();
    labels.sort();
    json!({
        "session_id": session.session_id,
        "kind": kind_name(config.kind),
        "num_features": config.num_features,
        "eps": config.eps,
        "momentum": if config.cumulative_average { Value::Null } else { json!(config.momentum) },
        "cumulative_average": config.cumulative_average,
        "affine": config.affine,
        "track_running_stats": config.track_running_stats,
        "param_dtype": dtype_name(config.param_dtype),
        "default_mode": if config.default_mode == pb::Mode::Eval as i32 { "eval" } else { "train" },
        "reject_non_finite": config.reject_non_finite,
        "device": session.device,
        "version": session.version,
        "num_batches_tracked": session.num_batches_tracked,
        "created_at": timestamp(&session.created_at),
        "updated_at": timestamp(&session.updated_at),
        "last_used_at": timestamp(&session.last_used_at),
        "labels": labels.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

pub fn session_row(session: &pb::Session) -> Vec<String> {
    let config = session.config.clone().unwrap_or_default();
    vec![
        session.session_id.clone(),
        kind_name(config.kind).to_owned(),
        config.num_features.to_string(),
        dtype_name(config.param_dtype).to_owned(),
        session.device.clone(),
        session.version.to_string(),
        session.num_batches_tracked.to_string(),
        plain(&timestamp(&session.updated_at)),
        labels(&config),
    ]
}

fn implementation_name(value: i32) -> &'static str {
    match pb::Implementation::try_from(value) {
        Ok(pb::Implementation::Reference) => "reference",
        Ok(pb::Implementation::Float64Reference) => "float64_reference",
        Ok(pb::Implementation::ManualBiased) => "manual_biased",
        Ok(pb::Implementation::ManualUnbiased) => "manual_unbiased",
        Ok(pb::Implementation::Candidate) => "candidate",
        _ => "unknown",
    }
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

fn difference(d: &Option<pb::Difference>) -> Value {
    d.as_ref().map_or(Value::Null, |d| {
        json!({
            "max_abs_diff": d.max_abs_diff,
            "max_rel_diff": d.max_rel_diff,
            "allclose": d.allclose,
            "mismatched_elements": d.mismatched_elements,
            "argmax_index": d.argmax_index,
        })
    })
}

pub fn comparison(reply: &pb::CompareResponse) -> Value {
    let reports: Vec<Value> = reply
        .reports
        .iter()
        .map(|r| {
            let parts: serde_json::Map<String, Value> = parts(r)
                .into_iter()
                .map(|(name, p)| {
                    (
                        name.to_owned(),
                        json!({
                            "vs_float64_reference": difference(&p.vs_float64_reference),
                            "vs_reference": difference(&p.vs_reference),
                        }),
                    )
                })
                .collect();
            json!({ "implementation": implementation_name(r.implementation), "parts": parts })
        })
        .collect();
    let diagnosis = reply.diagnosis.as_ref().map_or(Value::Null, |d| {
        json!({
            "matches_reference": d.matches_reference,
            "summary": d.summary,
            "ambiguities": d.ambiguities,
            "hypotheses": d.hypotheses.iter().map(|h| json!({
                "name": h.name, "explains": h.explains, "max_abs_diff": h.max_abs_diff,
                "explanation": h.explanation, "fix": h.fix, "parts": h.parts,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "device": reply.device,
        "rtol": reply.rtol,
        "atol": reply.atol,
        "reports": reports,
        "diagnosis": diagnosis,
    })
}

pub fn print_comparison(reply: &pb::CompareResponse) {
    println!(
        "Compare on {} (rtol {:e}, atol {:e}); differences are max |a - b|",
        reply.device, reply.rtol, reply.atol
    );
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
                implementation_name(report.implementation).to_owned(),
                name.to_owned(),
                cell(&part.vs_float64_reference),
                cell(&part.vs_reference),
                close.to_owned(),
            ]);
        }
    }
    table.print();
    let Some(diagnosis) = &reply.diagnosis else {
        return;
    };
    println!("\nDiagnosis: {}", diagnosis.summary);
    for hypothesis in diagnosis.hypotheses.iter().filter(|h| h.explains) {
        println!("  * {}: {}", hypothesis.name, hypothesis.explanation);
        if !hypothesis.fix.is_empty() {
            println!("    fix: {}", hypothesis.fix);
        }
    }
    for ambiguity in &diagnosis.ambiguities {
        println!("  ? {ambiguity}");
    }
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
}
