//! Authentication: the admission policy ([`super::admission`]) in front of
//! every service that checks the bearer token, puts the caller's
//! [`Principal`] into the request's extensions for the handlers, and enforces
//! the per-tenant limit on requests in progress.
//!
//! `grpc.health.v1.Health` passes without a token (probes carry none; the
//! admission layer exempts it); every other path, reflection included, needs
//! one when a tokens file is configured. Without one, every request is [`Principal::anonymous`].
//! Refusals never echo the token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::admission::Admit;
use crate::auth::{Credential, Principal, Tokens};

/// Who may call, and how many requests each tenant may have in progress.
pub struct Gate {
    tokens: Option<Arc<Tokens>>,
    max_in_flight: Option<u64>,
    /// Requests in progress per tenant, shared with their [`InFlight`] places.
    in_flight: Arc<Mutex<HashMap<String, u64>>>,
}

impl Gate {
    pub fn new(tokens: Option<Arc<Tokens>>, max_in_flight: Option<u64>) -> Gate {
        Gate {
            tokens,
            max_in_flight,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The caller of a request with these headers (None: authentication is
    /// off, every caller is [`Principal::anonymous`]), or UNAUTHENTICATED.
    fn credential(&self, headers: &http::HeaderMap) -> Result<Option<Credential>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing bearer token: send the metadata `authorization: Bearer <token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "malformed authorization metadata: expected `Bearer <token>`",
            ));
        };
        tokens
            .credential(token)
            .map(Some)
            .ok_or_else(|| Status::unauthenticated("invalid or revoked bearer token"))
    }

    /// A place among the tenant's requests in progress, or RESOURCE_EXHAUSTED
    /// at once (requests are not queued).
    fn place(&self, tenant: &str) -> Result<Option<InFlight>, Status> {
        let Some(limit) = self.max_in_flight else {
            return Ok(None);
        };
        let mut counts = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(tenant.to_owned()).or_insert(0);
        if *count >= limit {
            return Err(Status::resource_exhausted(format!(
                "tenant has {count} requests in progress, the limit is {limit} (tenant_max_concurrent_requests); retry later"
            )));
        }
        *count += 1;
        Ok(Some(InFlight {
            counts: self.in_flight.clone(),
            tenant: tenant.to_owned(),
        }))
    }
}

impl Admit for Gate {
    type Place = InFlight;

    /// The caller, from the token in the headers: its [`Principal`] (and
    /// [`Credential`]) into the request's extensions, or UNAUTHENTICATED.
    fn identify(
        &self,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<(), Status> {
        let credential = self.credential(headers)?;
        let principal = credential
            .as_ref()
            .map_or_else(Principal::anonymous, |c| c.principal().clone());
        // Into the request's span (the telemetry layer's), for its log line.
        tracing::Span::current().record("tenant", principal.tenant.as_str());
        extensions.insert(principal);
        if let Some(credential) = credential {
            extensions.insert(credential);
        }
        Ok(())
    }

    /// A place among the tenant's requests in progress, for a request
    /// [`Self::identify`] let through.
    fn admit(
        &self,
        _headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<InFlight>, Status> {
        // Absent only if identify was not asked first: refuse rather than
        // admit an unauthenticated request.
        let Some(principal) = extensions.get::<Principal>() else {
            return Err(Status::unauthenticated("request was not authenticated"));
        };
        self.place(&principal.tenant)
    }
}

/// One request in progress, counted until its response body ends (the whole
/// stream, for ForwardStream) or is dropped (the client went away).
pub struct InFlight {
    counts: Arc<Mutex<HashMap<String, u64>>>,
    tenant: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// Whether the token a long call (a stream) was admitted with is still in
/// force: UNAUTHENTICATED once a reload revoked it (or gave it to another
/// tenant or role). Calls admitted without authentication always pass.
pub fn check_still_authorized(credential: Option<&Credential>) -> Result<(), Status> {
    match credential {
        Some(credential) if !credential.is_still_valid() => Err(Status::unauthenticated(
            "bearer token revoked while the stream was open: reconnect with a valid token",
        )),
        _ => Ok(()),
    }
}

/// The credential a request was admitted with (None without authentication).
pub fn credential<T>(request: &tonic::Request<T>) -> Option<Credential> {
    request.extensions().get::<Credential>().cloned()
}

/// The caller of a request that passed the [`Gate`].
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
    // Absent only if a service were served without the layer: refuse rather
    // than serve it unauthenticated.
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}
