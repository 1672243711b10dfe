//! The tenancy store against a real single-node metadata store.

use std::time::Duration;

use magnetar_metadata::{MetaClient, MetaNode, NodeConfig};
use magnetar_tenancy::{
    ClusterData, NamespaceName, Policies, RetentionPolicies, TenancyError, TenancyStore, TenantInfo,
};

async fn start() -> (tempfile::TempDir, MetaNode, TenancyStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = MetaNode::start(NodeConfig::single(
        "127.0.0.1:0".parse().expect("addr"),
        dir.path().join("meta"),
    ))
    .await
    .expect("meta");
    node.wait_for_leader(Duration::from_secs(10))
        .await
        .expect("leader");
    let client = MetaClient::new(&[node.local_addr().to_string()]).expect("client");
    (dir, node, TenancyStore::new(client))
}

#[tokio::test]
async fn defaults_tenants_namespaces_and_policies() {
    let (_dir, _node, store) = start().await;
    store
        .ensure_defaults("local", &ClusterData::default())
        .await
        .expect("defaults");
    // Idempotent: a second start finds everything in place.
    store
        .ensure_defaults("local", &ClusterData::default())
        .await
        .expect("defaults again");
    let default_ns = NamespaceName::default_namespace();
    assert!(store.namespace_exists(&default_ns).await.expect("exists"));
    assert_eq!(store.list_tenants().await.expect("tenants"), vec!["public"]);
    assert_eq!(
        store.list_clusters().await.expect("clusters"),
        vec!["local"]
    );

    let info = TenantInfo {
        admin_roles: ["ops".to_string()].into(),
        allowed_clusters: ["local".to_string()].into(),
    };
    store.create_tenant("acme", &info).await.expect("tenant");
    assert!(matches!(
        store.create_tenant("acme", &info).await,
        Err(TenancyError::AlreadyExists(_))
    ));
    let bad_cluster = TenantInfo {
        allowed_clusters: ["mars".to_string()].into(),
        ..TenantInfo::default()
    };
    assert!(matches!(
        store.create_tenant("other", &bad_cluster).await,
        Err(TenancyError::InvalidPolicy(_))
    ));
    assert!(matches!(
        store.create_tenant("bad name", &info).await,
        Err(TenancyError::InvalidName(_))
    ));

    let ns: NamespaceName = "acme/iot".parse().expect("ns");
    store
        .create_namespace(&ns, &Policies::default())
        .await
        .expect("namespace");
    let missing_tenant: NamespaceName = "nobody/iot".parse().expect("ns");
    assert!(matches!(
        store
            .create_namespace(&missing_tenant, &Policies::default())
            .await,
        Err(TenancyError::NotFound(_))
    ));
    let p = store
        .modify_policies(&ns, |p| {
            p.retention_policies = Some(RetentionPolicies {
                retention_time_in_minutes: 10,
                retention_size_in_mb: -1,
            });
            Ok(())
        })
        .await
        .expect("modify");
    assert_eq!(store.get_policies(&ns).await.expect("get"), p);
    assert!(matches!(
        store
            .modify_policies(&ns, |p| {
                p.bundles.num_bundles = 0;
                Ok(())
            })
            .await,
        Err(TenancyError::InvalidPolicy(_))
    ));
    assert_eq!(
        store.list_namespaces("acme").await.expect("list"),
        vec![ns.clone()]
    );

    assert!(matches!(
        store.delete_tenant("acme").await,
        Err(TenancyError::NotEmpty(_))
    ));
    assert!(matches!(
        store.delete_cluster("local").await,
        Err(TenancyError::NotEmpty(_))
    ));
    store.delete_namespace(&ns).await.expect("delete ns");
    store.delete_tenant("acme").await.expect("delete tenant");
    assert!(matches!(
        store.get_tenant("acme").await,
        Err(TenancyError::NotFound(_))
    ));
}

#[tokio::test]
async fn concurrent_policy_updates_all_land() {
    let (_dir, _node, store) = start().await;
    store
        .ensure_defaults("local", &ClusterData::default())
        .await
        .expect("defaults");
    let ns = NamespaceName::default_namespace();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let ns = ns.clone();
            tokio::spawn(async move {
                store
                    .modify_policies(&ns, |p| {
                        p.replication_clusters.insert(format!("c{i}"));
                        Ok(())
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("modify");
    }
    let p = store.get_policies(&ns).await.expect("get");
    assert_eq!(p.replication_clusters.len(), 9);
}
