//! The OneCommons blueprint language.
//!
//! A blueprint (`commons.yaml`) declares a service's components, inputs,
//! secrets and upstream projects. [`load`] turns one into a validated,
//! flattened [`Blueprint`] or a list of [`Diagnostic`]s, each with file,
//! line, column and a suggested fix. This crate does no I/O of its own:
//! files come through a [`Sources`].

#![forbid(unsafe_code)]

pub mod diag;
pub mod graph;
pub mod load;
pub mod model;
pub mod schema;
pub mod template;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics};
pub use graph::topo_order;
pub use load::{load, load_str, FileSystem, InMemory, Sources, FILE_NAME};
pub use model::*;
pub use template::{Ref, Segment, Template};
