//! Fair permits: a fixed number of permits, handed to waiters round-robin
//! across tenants and, within a tenant, across its connections; first come,
//! first served within one connection. One caller's flood therefore delays
//! another caller's job by at most one job per other busy tenant (and, for a
//! connection of the same tenant, one per other busy connection of it),
//! however many jobs the flood has queued.
//!
//! Queues exist only while they hold waiters: an idle tenant or connection
//! costs nothing. Their length is bounded by the requests in progress (the
//! admission limits), each of which waits for one permit at a time.
//!
//! No domain logic, no I/O: the compute pool is its one user.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Who a job runs for: its tenant and its connection (the peer's address;
/// None for work not done for a connection, such as recovery at start-up).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Caller {
    tenant: String,
    connection: Option<SocketAddr>,
}

impl Caller {
    pub fn new(tenant: String, connection: Option<SocketAddr>) -> Caller {
        Caller { tenant, connection }
    }
}

/// The permits and the waiters, per tenant and connection.
pub struct FairPermits {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    free: usize,
    /// Tenants with waiters, in the order their turns come.
    turns: VecDeque<String>,
    tenants: HashMap<String, TenantQueue>,
}

#[derive(Default)]
struct TenantQueue {
    /// Connections with waiters, in the order their turns come.
    turns: VecDeque<Option<SocketAddr>>,
    connections: HashMap<Option<SocketAddr>, VecDeque<oneshot::Sender<()>>>,
}

impl State {
    fn is_idle(&self) -> bool {
        self.turns.is_empty()
    }

    fn enqueue(&mut self, caller: &Caller, waiter: oneshot::Sender<()>) {
        let tenant = match self.tenants.get_mut(&caller.tenant) {
            Some(tenant) => tenant,
            None => {
                self.turns.push_back(caller.tenant.clone());
                self.tenants.entry(caller.tenant.clone()).or_default()
            }
        };
        let queue = tenant
            .connections
            .entry(caller.connection)
            .or_insert_with(|| {
                tenant.turns.push_back(caller.connection);
                VecDeque::new()
            });
        queue.push_back(waiter);
    }

    /// The next waiter whose turn it is: the next tenant's next
    /// connection's oldest; each moves to the back of its ring.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<()>> {
        let tenant_key = self.turns.pop_front()?;
        let tenant = self.tenants.get_mut(&tenant_key)?;
        let waiter = tenant.turns.pop_front().and_then(|connection| {
            let queue = tenant.connections.get_mut(&connection)?;
            let waiter = queue.pop_front();
            if queue.is_empty() {
                tenant.connections.remove(&connection);
            } else {
                tenant.turns.push_back(connection);
            }
            waiter
        });
        if tenant.turns.is_empty() {
            self.tenants.remove(&tenant_key);
        } else {
            self.turns.push_back(tenant_key);
        }
        waiter
    }
}

impl FairPermits {
    /// `permits` permits (at least one).
    pub fn new(permits: usize) -> Arc<FairPermits> {
        Arc::new(FairPermits {
            state: Mutex::new(State {
                free: permits.max(1),
                ..State::default()
            }),
        })
    }

    /// A permit for `caller`, at once when one is free and nobody waits,
    /// else when its turn comes.
    pub async fn acquire(self: &Arc<Self>, caller: &Caller) -> FairPermit {
        let receiver = {
            let mut state = self.lock();
            if state.free > 0 && state.is_idle() {
                state.free -= 1;
                return FairPermit {
                    permits: self.clone(),
                };
            }
            let (sender, receiver) = oneshot::channel();
            state.enqueue(caller, sender);
            receiver
        };
        let mut waiting = Waiting {
            receiver,
            permits: self.clone(),
            taken: false,
        };
        // A sender is only dropped unsent once its receiver is gone, and
        // the queues live as long as this waiter holds them: Ok(()) comes.
        let _ = (&mut waiting.receiver).await;
        waiting.taken = true;
        FairPermit {
            permits: self.clone(),
        }
    }

    /// Permits free now (for tests and diagnostics).
    pub fn available(&self) -> usize {
        self.lock().free
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit comes back: it goes to the next waiter whose turn it is
    /// (skipping any that gave up), else it is free.
    fn release(&self) {
        let mut state = self.lock();
        while let Some(waiter) = state.next_waiter() {
            if waiter.send(()).is_ok() {
                return;
            }
        }
        state.free += 1;
    }
}

/// A waiter that may be dropped (its request cancelled) before or after its
/// turn came: a turn given to it and not taken goes to the next waiter.
struct Waiting {
    receiver: oneshot::Receiver<()>,
    permits: Arc<FairPermits>,
    /// The turn came and its permit was handed out.
    taken: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        self.receiver.close();
        if self.receiver.try_recv().is_ok() {
            self.permits.release();
        }
    }
}

/// One permit, given back when dropped.
pub struct FairPermit {
    permits: Arc<FairPermits>,
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        self.permits.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn caller(tenant: &str, port: u16) -> Caller {
        Caller::new(
            tenant.to_owned(),
            Some(SocketAddr::from(([127, 0, 0, 1], port))),
        )
    }

    fn queued(permits: &FairPermits) -> usize {
        let state = permits.lock();
        let per_tenant = state.tenants.values();
        per_tenant
            .map(|t| t.connections.values().map(VecDeque::len).sum::<usize>())
            .sum()
    }

    /// Queues waiters in `order`, then releases the one held permit; the
    /// order in which they get it.
    async fn served_order(order: &[Caller]) -> Vec<usize> {
        let permits = FairPermits::new(1);
        let held = permits.acquire(&caller("x", 1)).await;
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
        for (index, who) in order.iter().enumerate() {
            let (shared, who, done) = (permits.clone(), who.clone(), done.clone());
            tokio::spawn(async move {
                let permit = shared.acquire(&who).await;
                done.send(index).unwrap();
                // Held a moment, so the next turn is decided by the queues.
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(permit);
            });
            // Each waiter queued before the next one is spawned.
            while queued(&permits) < index + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        let mut served = Vec::new();
        for _ in order {
            served.push(finished.recv().await.unwrap());
        }
        served
    }

    #[tokio::test]
    async fn turns_alternate_between_tenants_whatever_one_has_queued() {
        let flood = caller("flood", 1);
        let polite = caller("polite", 2);
        let order = [
            flood.clone(),
            flood.clone(),
            flood.clone(),
            flood.clone(),
            polite.clone(),
            polite.clone(),
        ];
        // Flood's first, then polite's first (not the flood's other three).
        assert_eq!(served_order(&order).await, vec![0, 4, 1, 5, 2, 3]);
    }

    #[tokio::test]
    async fn within_a_tenant_turns_alternate_between_connections() {
        let a = caller("t", 1);
        let b = caller("t", 2);
        let order = [a.clone(), a.clone(), a.clone(), b.clone()];
        assert_eq!(served_order(&order).await, vec![0, 3, 1, 2]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_its_turn_on() {
        let permits = FairPermits::new(1);
        let held = permits.acquire(&caller("a", 1)).await;
        let gone = tokio::spawn({
            let permits = permits.clone();
            async move { permits.acquire(&caller("b", 2)).await }
        });
        while permits.lock().is_idle() {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        drop(held);
        assert_eq!(permits.available(), 1);
        let again = permits.acquire(&caller("c", 3)).await;
        assert_eq!(permits.available(), 0);
        drop(again);
        assert_eq!(permits.available(), 1);
    }
}
