//! `health` and `info`: the server as a whole.

use std::io::Write;

use serde_json::json;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

use crate::output::Output;
use crate::proto::v1 as pb;
use crate::proto::v1::server_service_client::ServerServiceClient;
use crate::{json, render, CliError, Remote};

/// Exit 0 only when the service is SERVING.
pub async fn health(out: &mut Output, remote: &Remote, service: String) -> Result<(), CliError> {
    let (channel, bearer) = remote.channel().await?;
    let reply = HealthClient::with_interceptor(channel, bearer)
        .check(HealthCheckRequest { service })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown);
    let name = status.as_str_name();
    if remote.json {
        // The HealthCheckResponse in proto3 JSON: its one field.
        json::print_value(out, &json!({ "status": name }))?;
    } else {
        writeln!(out, "{name}")?;
    }
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(CliError::NotServing(name.to_owned()))
    }
}

pub async fn info(out: &mut Output, remote: &Remote) -> Result<(), CliError> {
    let (channel, bearer) = remote.channel().await?;
    let info = ServerServiceClient::with_interceptor(channel, bearer)
        .get_server_info(pb::GetServerInfoRequest::default())
        .await?
        .into_inner();
    if remote.json {
        return json::print(out, &info);
    }
    render::server_info(&info).print(out)?;
    Ok(())
}
