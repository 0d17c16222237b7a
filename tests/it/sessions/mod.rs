//! Session lifecycle, validation and state semantics of BatchNormService,
//! one file per topic.

mod forward_checks;
mod lifecycle;
mod mutations;
mod numbers;
mod validation;
mod versions;
