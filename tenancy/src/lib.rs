//! Magnetar's tenancy model: how things are named and which policies apply.
//!
//! - [`names`]: tenants, namespaces and topics (`persistent://t/ns/topic`),
//!   with the validation every entry point shares, so that the REST API, the
//!   CLI and each protocol accept exactly the same names.
//! - [`policies`]: tenant info, namespace policies and cluster records, in
//!   the JSON shapes Pulsar's admin API uses where Pulsar has them.
//! - [`TenancyStore`]: their storage in the metadata store, with
//!   compare-and-set updates so that concurrent admins never overwrite each
//!   other silently.
//!
//! - [`auth`]: token authentication (Pulsar's JWTs) behind the
//!   [`AuthProvider`] hook, and the permission rule.
//!
//! Enforcement (authentication, permissions, quotas) lives with whoever
//! serves a request; this crate holds the model.

pub mod auth;
mod error;
pub mod names;
pub mod policies;
mod store;

pub use auth::{AuthProvider, Credentials, TokenAuth};
pub use error::{Result, TenancyError};
pub use names::{NamespaceName, TopicDomain, TopicName};
pub use policies::{
    AuthAction, BacklogQuota, BacklogQuotaPolicy, ClusterData, DispatchRate, Policies,
    RetentionPolicies, TenantInfo,
};
pub use store::{TenancyStore, DEFAULT_NAMESPACE, DEFAULT_TENANT};
