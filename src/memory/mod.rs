//! The process' memory: how the allocator keeps freed buffers ([`malloc`]),
//! the server-wide memory budget every part charges what it holds on behalf
//! of clients to ([`budget`]), and the memory the process may use at most,
//! from which the budget's default is derived ([`limit`]).
//!
//! Used anywhere (session, transport, the assembly); depends on no layer.

pub mod budget;
pub mod limit;
mod malloc;

pub use budget::{
    charge_unless_large, format_bytes, parse_bytes, BudgetExhausted, Charge, Kind, MemoryBudget,
    ALWAYS_ADMITTED_BYTES,
};
pub use malloc::retain_freed_buffers;
