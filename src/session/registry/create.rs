//! Creating sessions: validating the configuration, counting a creation
//! against the session limits (in all and per tenant) while it is under way,
//! storing the new session's first record, and answering a create of an
//! existing session (the same configuration: its state; another one:
//! ALREADY_EXISTS naming the fields that differ).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tch::Device;

use super::{Limits, Registry, Session};
use crate::numerics::batch_norm::{check_eps, check_momentum};
use crate::numerics::Momentum;
use crate::session::durable::Written;
use crate::session::record::record;
use crate::session::replay::ReplayLog;
use crate::session::state::{snapshot, LastUse, SessionInfo, SessionState};
use crate::session::steps::{check_num_batches_tracked, initial_layer};
use crate::session::{
    check_labels, CreateSession, Created, SessionConfig, SessionError, SessionId,
};

impl Registry {
    /// Creates a session, or answers the existing one when it has the same
    /// configuration (a retried create); limits count creations under way.
    pub async fn create(&self, command: CreateSession) -> Result<Created, SessionError> {
        let limits = self.options.limits;
        validate_config(&command.config, &limits)?;
        check_num_batches_tracked(&command.config, command.num_batches_tracked)?;
        let device = command.device.resolve(Some(self.options.default_device))?;
        if let Some(id) = &command.id {
            match self.lookup(id).await {
                Ok(existing) => {
                    return self
                        .existing_for_create(existing, &command.config, device)
                        .await
                }
                Err(SessionError::NotFound(_)) => {}
                Err(other) => return Err(other),
            }
        }
        let id = command
            .id
            .clone()
            .unwrap_or_else(|| SessionId::generate_in(&command.tenant));
        let _slot = self.reserve_slot(id.tenant())?;
        let info = SessionInfo {
            id,
            config: command.config.clone(),
            device,
            created_at: SystemTime::now(),
            last_used: LastUse::new(SystemTime::now()),
        };
        let with_record = self.store.is_some();
        let (info, built) = self
            .pool
            .run(move || {
                let built = initial_layer(
                    &info.config,
                    device,
                    &command.initial,
                    command.num_batches_tracked,
                )
                .and_then(|layer| {
                    let record = if with_record {
                        Some(record(&info, &layer, Vec::new())?)
                    } else {
                        None
                    };
                    let snapshot = snapshot(&info, &layer, true)?;
                    Ok((layer, record, snapshot))
                });
                (info, built)
            })
            .await?;
        let (layer, record, snapshot) = built?;
        let id = info.id.clone();
        let mut stored = false;
        if let (Some(store), Some(record)) = (&self.store, record) {
            match store.put(&record, None).await? {
                Written::Committed => stored = true,
                Written::Conflict => {
                    // Created meanwhile by another request or replica.
                    let existing = self.lookup(&id).await?;
                    return self
                        .existing_for_create(existing, &command.config, device)
                        .await;
                }
            }
        }
        let session = Arc::new(Session::new(
            info,
            SessionState {
                layer,
                deleted: false,
                evicted: false,
                replay: ReplayLog::new(&self.replay),
            },
        ));
        let existing = {
            let mut map = self.write_map();
            match map.get(&id) {
                Some(existing) => Some(existing.clone()),
                None => {
                    map.insert(id.clone(), session);
                    None
                }
            }
        };
        match existing {
            // Our record is the stored one; a concurrent lookup cached it first.
            Some(_) if stored => Ok(Created {
                snapshot,
                already_existed: false,
            }),
            // Without a store, another create with the same id won the race.
            Some(existing) => {
                self.existing_for_create(existing, &command.config, device)
                    .await
            }
            None => Ok(Created {
                snapshot,
                already_existed: false,
            }),
        }
    }

    /// Counts a creation in `tenant` against `max_sessions` and the tenant's
    /// limit until it is dropped.
    fn reserve_slot(&self, tenant: &str) -> Result<Reservation<'_>, SessionError> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let taken = self.len() as u64 + reserved.total;
        if taken >= self.options.limits.max_sessions {
            return Err(too_many_sessions(
                taken + 1,
                self.options.limits.max_sessions,
            ));
        }
        if let Some(limit) = self.options.limits.max_sessions_per_tenant {
            let pending = reserved.by_tenant.get(tenant).copied().unwrap_or(0);
            let taken = self.tenant_len(tenant) as u64 + pending;
            if taken >= limit {
                return Err(SessionError::LimitExceeded {
                    what: "session count of the tenant",
                    actual: taken + 1,
                    limit,
                    limit_name: "tenant_max_sessions",
                });
            }
        }
        reserved.total += 1;
        *reserved.by_tenant.entry(tenant.to_owned()).or_insert(0) += 1;
        Ok(Reservation {
            reserved: &self.reserved,
            tenant: tenant.to_owned(),
        })
    }

    async fn existing_for_create(
        &self,
        existing: Arc<Session>,
        config: &SessionConfig,
        device: Device,
    ) -> Result<Created, SessionError> {
        existing.info.last_used.touch();
        let difference =
            config_difference(&existing.info.config, existing.info.device, config, device);
        if !difference.is_empty() {
            return Err(SessionError::AlreadyExists {
                id: existing.info.id.clone(),
                difference: difference.join(", "),
            });
        }
        let id = existing.info.id.clone();
        let snapshot = self
            .read(&id, |info, state| snapshot(info, &state.layer, true))
            .await?;
        Ok(Created {
            snapshot,
            already_existed: true,
        })
    }
}

/// Creations under way: in all, and per tenant.
#[derive(Default)]
pub(super) struct Reserved {
    total: u64,
    by_tenant: BTreeMap<String, u64>,
}

/// A creation's place under the session limits, released when the creation
/// ends (by then the session is in the map, or it failed).
struct Reservation<'a> {
    reserved: &'a std::sync::Mutex<Reserved>,
    tenant: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved.total = reserved.total.saturating_sub(1);
        if let Some(count) = reserved.by_tenant.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                reserved.by_tenant.remove(&self.tenant);
            }
        }
    }
}

fn too_many_sessions(actual: u64, limit: u64) -> SessionError {
    SessionError::LimitExceeded {
        what: "session count",
        actual,
        limit,
        limit_name: "max_sessions",
    }
}

fn validate_config(config: &SessionConfig, limits: &Limits) -> Result<(), SessionError> {
    if config.num_features < 1 {
        return Err(SessionError::InvalidArgument(format!(
            "num_features must be >= 1, got {}",
            config.num_features
        )));
    }
    if config.num_features > limits.max_num_features {
        return Err(SessionError::LimitExceeded {
            what: "num_features",
            actual: config.num_features as u64,
            limit: limits.max_num_features as u64,
            limit_name: "max_num_features",
        });
    }
    check_eps("eps", config.eps)?;
    if let Momentum::Exponential(m) = config.momentum {
        check_momentum("momentum", m)?;
    }
    check_labels(&config.labels)
}

/// Names of the fields in which two creations differ.
fn config_difference(
    a: &SessionConfig,
    a_device: Device,
    b: &SessionConfig,
    b_device: Device,
) -> Vec<String> {
    let mut fields = Vec::new();
    let mut differs = |name: &str, same: bool| {
        if !same {
            fields.push(name.to_owned());
        }
    };
    differs("kind", a.kind == b.kind);
    differs("num_features", a.num_features == b.num_features);
    differs("eps", a.eps == b.eps);
    differs("momentum", a.momentum == b.momentum);
    differs("affine", a.affine == b.affine);
    differs(
        "track_running_stats",
        a.track_running_stats == b.track_running_stats,
    );
    differs("param_dtype", a.param_dtype == b.param_dtype);
    differs("default_mode", a.default_mode == b.default_mode);
    differs(
        "reject_non_finite",
        a.reject_non_finite == b.reject_non_finite,
    );
    differs("labels", a.labels == b.labels);
    differs("step_timeout_seconds", a.step_timeout == b.step_timeout);
    differs("device", a_device == b_device);
    fields
}
