//! Embeddable API gateway core.
pub mod router;
