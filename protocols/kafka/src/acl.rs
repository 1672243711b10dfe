//! Kafka's ACL APIs over namespace permissions.
//!
//! A role's rights in a namespace are its grants (produce, consume,
//! admin), not per-resource ACLs, so the ACLs Kafka tools see and make
//! are those grants in Kafka's terms: principal `User:<role>`, resource
//! name `*` (the whole namespace), host `*`, ALLOW.
//!
//! | grant | ACLs described | ACLs that grant it |
//! |---|---|---|
//! | produce | TOPIC WRITE, TRANSACTIONAL_ID WRITE | those, TRANSACTIONAL_ID DESCRIBE, CLUSTER IDEMPOTENT_WRITE |
//! | consume | TOPIC READ, GROUP READ | those, GROUP DESCRIBE |
//! | admin | TOPIC ALL | TOPIC ALL, DELETE, ALTER, ALTER_CONFIGS; GROUP DELETE |
//!
//! TOPIC DESCRIBE, CREATE and DESCRIBE_CONFIGS come with any grant and add
//! none. DENY, a named resource, a prefix or a host cannot be expressed
//! and are refused with a message that says so, never widened.

use kafka_protocol::messages::*;
use kafka_protocol::ResponseError as E;
use magnetar_tenancy::AuthAction;

use crate::handler::{str, Caller, Ctx};

// Kafka's enums, as the wire carries them.
const RESOURCE_ANY: i8 = 1;
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_GROUP: i8 = 3;
const RESOURCE_CLUSTER: i8 = 4;
const RESOURCE_TRANSACTIONAL_ID: i8 = 5;
const PATTERN_ANY: i8 = 1;
const PATTERN_MATCH: i8 = 2;
const PATTERN_LITERAL: i8 = 3;
const OP_ANY: i8 = 1;
const OP_ALL: i8 = 2;
const OP_READ: i8 = 3;
const OP_WRITE: i8 = 4;
const OP_CREATE: i8 = 5;
const OP_DELETE: i8 = 6;
const OP_ALTER: i8 = 7;
const OP_DESCRIBE: i8 = 8;
const OP_DESCRIBE_CONFIGS: i8 = 10;
const OP_ALTER_CONFIGS: i8 = 11;
const OP_IDEMPOTENT_WRITE: i8 = 12;
const PERMISSION_ANY: i8 = 1;
const PERMISSION_ALLOW: i8 = 3;

/// The one resource name, host and principal type there are.
const WILDCARD: &str = "*";
const USER: &str = "User:";

/// One ACL as Kafka describes it, always LITERAL, host `*` and ALLOW.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Binding {
    pub role: String,
    pub resource_type: i8,
    pub resource_name: String,
    pub operation: i8,
}

/// What an ACL asks for, in grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asks {
    Grant(AuthAction),
    /// Comes with any grant.
    Implied,
}

/// The ACLs a grant is described as.
pub(crate) fn bindings_of(role: &str, action: AuthAction) -> Vec<Binding> {
    let b = |resource_type, operation| Binding {
        role: role.to_string(),
        resource_type,
        resource_name: WILDCARD.into(),
        operation,
    };
    match action {
        AuthAction::Produce => vec![
            b(RESOURCE_TOPIC, OP_WRITE),
            b(RESOURCE_TRANSACTIONAL_ID, OP_WRITE),
        ],
        AuthAction::Consume => vec![b(RESOURCE_TOPIC, OP_READ), b(RESOURCE_GROUP, OP_READ)],
        AuthAction::Admin => vec![b(RESOURCE_TOPIC, OP_ALL)],
    }
}

/// The role and grant an ACL to create stands for, or why it cannot be
/// made.
pub(crate) fn parse_creation(
    resource_type: i8,
    resource_name: &str,
    pattern_type: i8,
    principal: &str,
    host: &str,
    operation: i8,
    permission_type: i8,
) -> Result<(String, Asks), String> {
    let role = principal
        .strip_prefix(USER)
        .filter(|r| !r.is_empty() && *r != WILDCARD)
        .ok_or_else(|| format!("principal {principal:?} is not User:<role>"))?;
    if permission_type != PERMISSION_ALLOW {
        return Err(
            "only ALLOW: a role holds the permissions granted to it, and nothing denies them"
                .into(),
        );
    }
    if host != WILDCARD {
        return Err("permissions hold from every host: the host must be '*'".into());
    }
    if pattern_type != PATTERN_LITERAL || resource_name != WILDCARD {
        return Err(
            "permissions are granted per namespace: the resource must be the literal '*'".into(),
        );
    }
    let asks = match (resource_type, operation) {
        (RESOURCE_TOPIC, OP_WRITE)
        | (RESOURCE_TRANSACTIONAL_ID, OP_WRITE | OP_DESCRIBE)
        | (RESOURCE_CLUSTER, OP_IDEMPOTENT_WRITE) => Asks::Grant(AuthAction::Produce),
        (RESOURCE_TOPIC, OP_READ) | (RESOURCE_GROUP, OP_READ | OP_DESCRIBE) => {
            Asks::Grant(AuthAction::Consume)
        }
        (RESOURCE_TOPIC, OP_ALL | OP_DELETE | OP_ALTER | OP_ALTER_CONFIGS)
        | (RESOURCE_GROUP, OP_DELETE) => Asks::Grant(AuthAction::Admin),
        (RESOURCE_TOPIC, OP_DESCRIBE | OP_CREATE | OP_DESCRIBE_CONFIGS) => Asks::Implied,
        (t, o) => {
            return Err(format!(
                "operation {o} on resource type {t} has no namespace permission"
            ))
        }
    };
    Ok((role.to_string(), asks))
}

/// A DescribeAcls or DeleteAcls filter.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    pub resource_type: i8,
    pub resource_name: Option<String>,
    pub pattern_type: i8,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: i8,
    pub permission_type: i8,
}

/// The filter of a DescribeAclsRequest or a DeleteAclsFilter, whose
/// fields have the same names.
macro_rules! filter_of {
    ($f:expr) => {
        Filter {
            resource_type: $f.resource_type_filter,
            resource_name: $f.resource_name_filter.map(|s| s.to_string()),
            pattern_type: $f.pattern_type_filter,
            principal: $f.principal_filter.map(|s| s.to_string()),
            host: $f.host_filter.map(|s| s.to_string()),
            operation: $f.operation,
            permission_type: $f.permission_type,
        }
    };
}

impl Filter {
    pub fn matches(&self, b: &Binding) -> bool {
        let resource = self.resource_type == RESOURCE_ANY || self.resource_type == b.resource_type;
        // Every binding is the literal wildcard, which MATCH finds for any
        // name.
        let name = match self.pattern_type {
            PATTERN_ANY | PATTERN_LITERAL => self
                .resource_name
                .as_deref()
                .is_none_or(|n| n == b.resource_name),
            PATTERN_MATCH => true,
            _ => false,
        };
        let principal = self
            .principal
            .as_deref()
            .is_none_or(|p| p.strip_prefix(USER) == Some(b.role.as_str()));
        let host = self.host.as_deref().is_none_or(|h| h == WILDCARD);
        let operation = self.operation == OP_ANY || self.operation == b.operation;
        let permission =
            self.permission_type == PERMISSION_ANY || self.permission_type == PERMISSION_ALLOW;
        resource && name && principal && host && operation && permission
    }
}

/// Kafka's answer when no authorizer is configured.
const NO_AUTHORIZER: &str = "authentication is off, so there are no permissions to manage";

impl Ctx {
    /// ACL requests need authentication on, and the namespace admin.
    fn acl_refusal(&self, c: &Caller) -> Option<(i16, &'static str)> {
        if !self.broker.auth_enabled() {
            Some((E::SecurityDisabled.code(), NO_AUTHORIZER))
        } else if !c.grants.admin {
            Some((
                E::ClusterAuthorizationFailed.code(),
                "managing permissions needs the namespace admin role",
            ))
        } else {
            None
        }
    }

    /// Every ACL the namespace's grants stand for.
    async fn namespace_bindings(&self, c: &Caller) -> Result<Vec<Binding>, (i16, String)> {
        let policies = self
            .broker
            .tenancy()
            .get_policies(&c.ns)
            .await
            .map_err(|e| (E::UnknownServerError.code(), e.to_string()))?;
        Ok(policies
            .auth_policies
            .namespace_auth
            .iter()
            .flat_map(|(role, actions)| actions.iter().flat_map(|&a| bindings_of(role, a)))
            .collect())
    }

    pub(crate) async fn describe_acls(
        &self,
        c: &Caller,
        r: DescribeAclsRequest,
    ) -> DescribeAclsResponse {
        use kafka_protocol::messages::describe_acls_response::{
            AclDescription, DescribeAclsResource,
        };
        let mut out = DescribeAclsResponse::default();
        if let Some((code, msg)) = self.acl_refusal(c) {
            out.error_code = code;
            out.error_message = Some(str(msg));
            return out;
        }
        let filter = filter_of!(r);
        let bindings = match self.namespace_bindings(c).await {
            Ok(b) => b,
            Err((code, msg)) => {
                out.error_code = code;
                out.error_message = Some(str(msg));
                return out;
            }
        };
        for b in bindings.into_iter().filter(|b| filter.matches(b)) {
            let acl = AclDescription::default()
                .with_principal(str(format!("{USER}{}", b.role)))
                .with_host(str(WILDCARD))
                .with_operation(b.operation)
                .with_permission_type(PERMISSION_ALLOW);
            match out.resources.iter_mut().find(|res| {
                res.resource_type == b.resource_type
                    && res.resource_name.as_str() == b.resource_name
            }) {
                Some(res) => res.acls.push(acl),
                None => out.resources.push(
                    DescribeAclsResource::default()
                        .with_resource_type(b.resource_type)
                        .with_resource_name(str(b.resource_name))
                        .with_pattern_type(PATTERN_LITERAL)
                        .with_acls(vec![acl]),
                ),
            }
        }
        out
    }

    pub(crate) async fn create_acls(&self, c: &Caller, r: CreateAclsRequest) -> CreateAclsResponse {
        use kafka_protocol::messages::create_acls_response::AclCreationResult;
        let refused = self.acl_refusal(c);
        let parsed: Vec<Result<(String, Asks), (i16, String)>> = r
            .creations
            .iter()
            .map(|a| match refused {
                Some((code, msg)) => Err((code, msg.to_string())),
                None => parse_creation(
                    a.resource_type,
                    &a.resource_name,
                    a.resource_pattern_type,
                    &a.principal,
                    &a.host,
                    a.operation,
                    a.permission_type,
                )
                .map_err(|m| (E::InvalidRequest.code(), m)),
            })
            .collect();
        let grants: Vec<(String, AuthAction)> = parsed
            .iter()
            .filter_map(|p| match p {
                Ok((role, Asks::Grant(a))) => Some((role.clone(), *a)),
                _ => None,
            })
            .collect();
        // An implied ACL needs the role to hold, or be given here, some
        // grant.
        let mut stored = Ok(());
        let mut holders = std::collections::BTreeSet::new();
        if parsed.iter().any(|p| p.is_ok()) {
            stored = self
                .broker
                .tenancy()
                .modify_policies(&c.ns, |p| {
                    for (role, action) in &grants {
                        p.auth_policies
                            .namespace_auth
                            .entry(role.clone())
                            .or_default()
                            .insert(*action);
                    }
                    holders = p
                        .auth_policies
                        .namespace_auth
                        .iter()
                        .filter(|(_, a)| !a.is_empty())
                        .map(|(r, _)| r.clone())
                        .collect();
                    Ok(())
                })
                .await
                .map(drop);
        }
        let results = parsed
            .into_iter()
            .map(|p| {
                let outcome = match (p, &stored) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err((E::UnknownServerError.code(), e.to_string())),
                    (Ok((role, Asks::Implied)), Ok(())) if !holders.contains(&role) => Err((
                        E::InvalidRequest.code(),
                        format!("this comes with READ or WRITE, and {role} holds neither"),
                    )),
                    (Ok(_), Ok(())) => Ok(()),
                };
                let mut res = AclCreationResult::default();
                if let Err((code, msg)) = outcome {
                    res.error_code = code;
                    res.error_message = Some(str(msg));
                }
                res
            })
            .collect();
        CreateAclsResponse::default().with_results(results)
    }

    pub(crate) async fn delete_acls(&self, c: &Caller, r: DeleteAclsRequest) -> DeleteAclsResponse {
        use kafka_protocol::messages::delete_acls_response::{
            DeleteAclsFilterResult, DeleteAclsMatchingAcl,
        };
        let mut out = DeleteAclsResponse::default();
        let filters: Vec<Filter> = r.filters.into_iter().map(|f| filter_of!(f)).collect();
        if let Some((code, msg)) = self.acl_refusal(c) {
            out.filter_results = filters
                .iter()
                .map(|_| {
                    DeleteAclsFilterResult::default()
                        .with_error_code(code)
                        .with_error_message(Some(str(msg)))
                })
                .collect();
            return out;
        }
        // A grant goes when any ACL it is described as matches; what is
        // reported deleted is every ACL of the grants that went.
        let mut removed: Vec<Vec<Binding>> = vec![Vec::new(); filters.len()];
        let stored = self
            .broker
            .tenancy()
            .modify_policies(&c.ns, |p| {
                removed = vec![Vec::new(); filters.len()];
                for (role, actions) in p.auth_policies.namespace_auth.iter_mut() {
                    let mut gone = Vec::new();
                    for &a in actions.iter() {
                        let described = bindings_of(role, a);
                        let mut hit = false;
                        for (i, f) in filters.iter().enumerate() {
                            if described.iter().any(|b| f.matches(b)) {
                                removed[i].extend(described.iter().cloned());
                                hit = true;
                            }
                        }
                        if hit {
                            gone.push(a);
                        }
                    }
                    for a in gone {
                        actions.remove(&a);
                    }
                }
                p.auth_policies
                    .namespace_auth
                    .retain(|_, actions| !actions.is_empty());
                Ok(())
            })
            .await;
        for list in removed {
            let mut res = DeleteAclsFilterResult::default();
            match &stored {
                Err(e) => {
                    res.error_code = E::UnknownServerError.code();
                    res.error_message = Some(str(e.to_string()));
                }
                Ok(_) => {
                    res.matching_acls = list
                        .into_iter()
                        .map(|b| {
                            DeleteAclsMatchingAcl::default()
                                .with_resource_type(b.resource_type)
                                .with_resource_name(str(b.resource_name))
                                .with_pattern_type(PATTERN_LITERAL)
                                .with_principal(str(format!("{USER}{}", b.role)))
                                .with_host(str(WILDCARD))
                                .with_operation(b.operation)
                                .with_permission_type(PERMISSION_ALLOW)
                        })
                        .collect();
                }
            }
            out.filter_results.push(res);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn create(resource_type: i8, operation: i8) -> Result<(String, Asks), String> {
        parse_creation(
            resource_type,
            "*",
            PATTERN_LITERAL,
            "User:app",
            "*",
            operation,
            PERMISSION_ALLOW,
        )
    }

    #[test]
    fn grants_round_trip_through_their_acls() {
        for action in [AuthAction::Produce, AuthAction::Consume, AuthAction::Admin] {
            for b in bindings_of("app", action) {
                assert_eq!(
                    create(b.resource_type, b.operation),
                    Ok(("app".into(), Asks::Grant(action))),
                    "{b:?}"
                );
            }
        }
    }

    #[test]
    fn what_cannot_be_expressed_is_refused_not_widened() {
        let refused = |name: &str, pattern, principal: &str, host: &str, permission| {
            parse_creation(
                RESOURCE_TOPIC,
                name,
                pattern,
                principal,
                host,
                OP_READ,
                permission,
            )
            .is_err()
        };
        assert!(refused(
            "orders",
            PATTERN_LITERAL,
            "User:app",
            "*",
            PERMISSION_ALLOW
        ));
        assert!(refused("*", 4, "User:app", "*", PERMISSION_ALLOW));
        assert!(refused("*", PATTERN_LITERAL, "User:app", "*", 2));
        assert!(refused(
            "*",
            PATTERN_LITERAL,
            "User:app",
            "10.0.0.1",
            PERMISSION_ALLOW
        ));
        assert!(refused(
            "*",
            PATTERN_LITERAL,
            "Group:app",
            "*",
            PERMISSION_ALLOW
        ));
        assert!(refused(
            "*",
            PATTERN_LITERAL,
            "User:*",
            "*",
            PERMISSION_ALLOW
        ));
        assert_eq!(
            create(RESOURCE_TOPIC, OP_DESCRIBE),
            Ok(("app".into(), Asks::Implied))
        );
        assert!(create(RESOURCE_CLUSTER, OP_ALTER).is_err());
    }

    #[test]
    fn filters_find_the_wildcard_as_kafka_does() {
        let b = &bindings_of("app", AuthAction::Consume)[0];
        let any = Filter {
            resource_type: RESOURCE_ANY,
            pattern_type: PATTERN_ANY,
            operation: OP_ANY,
            permission_type: PERMISSION_ANY,
            ..Filter::default()
        };
        assert!(any.matches(b));
        let named = |pattern_type, name: &str| Filter {
            resource_name: Some(name.into()),
            pattern_type,
            ..any.clone()
        };
        assert!(named(PATTERN_MATCH, "orders").matches(b));
        assert!(!named(PATTERN_LITERAL, "orders").matches(b));
        assert!(named(PATTERN_LITERAL, "*").matches(b));
        assert!(!named(4, "ord").matches(b));
        let principal = |p: &str| Filter {
            principal: Some(p.into()),
            ..any.clone()
        };
        assert!(principal("User:app").matches(b));
        assert!(!principal("User:other").matches(b));
        let deny = Filter {
            permission_type: 2,
            ..any.clone()
        };
        assert!(!deny.matches(b));
    }

    proptest! {
        /// Whatever bytes a client sends, a creation is either refused or
        /// names a role and a grant it could describe.
        #[test]
        fn any_creation_is_refused_or_consistent(
            resource_type in any::<i8>(),
            name in "[*a-z]{0,3}",
            pattern in any::<i8>(),
            principal in "(User:)?[*a-z]{0,4}",
            host in "[*0-9.]{0,3}",
            operation in any::<i8>(),
            permission in any::<i8>(),
        ) {
            if let Ok((role, asks)) = parse_creation(
                resource_type, &name, pattern, &principal, &host, operation, permission,
            ) {
                prop_assert_eq!(format!("User:{role}"), principal);
                prop_assert_eq!(name, "*");
                prop_assert_eq!(host, "*");
                if let Asks::Grant(a) = asks {
                    prop_assert!(!bindings_of(&role, a).is_empty());
                }
            }
        }
    }
}
