//! Guides, with examples that run as tests.

#[doc = include_str!("../docs/integration.md")]
pub mod integration {}

#[doc = include_str!("../docs/training.md")]
pub mod training {}
