//! SCIM 2.0 as a protocol (RFC 7643, RFC 7644): resource schemas, input normalization,
//! filters, PATCH and the error schema. Pure: no HTTP, no storage, so every rule here is
//! unit-tested without a server.
pub mod error;
pub mod filter;
pub mod patch;
pub mod resource;
pub mod schema;

pub use error::{ScimError, ScimResult, ScimType};
pub use schema::ResourceKind;
