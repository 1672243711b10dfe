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

#[tokio::test]
async fn clusters_get_geo_ids_keep_secrets_and_stay_while_replicated_to() {
    let (_dir, _node, store) = start().await;
    store
        .ensure_defaults("east", &ClusterData::default())
        .await
        .expect("defaults");
    let west = ClusterData {
        service_url: Some("http://127.0.0.1:18080".into()),
        authentication_plugin: Some("token".into()),
        authentication_parameters: Some("token:secret-jwt".into()),
        ..ClusterData::default()
    };
    store.create_cluster("west", &west).await.expect("west");
    let (east, stored) = (
        store.get_cluster("east").await.expect("east"),
        store.get_cluster("west").await.expect("west"),
    );
    assert_eq!((east.geo_id, stored.geo_id), (Some(1), Some(2)));
    assert_eq!(
        stored.redacted().authentication_parameters.as_deref(),
        Some(magnetar_tenancy::policies::REDACTED)
    );
    // A record sent back as read keeps its secret and its geoId.
    let mut update = stored.redacted();
    update.geo_id = Some(99);
    update.service_url = Some("http://127.0.0.1:18081".into());
    store.update_cluster("west", update).await.expect("update");
    let stored = store.get_cluster("west").await.expect("west");
    assert_eq!(stored.geo_id, Some(2));
    assert_eq!(
        stored.authentication_parameters.as_deref(),
        Some("token:secret-jwt")
    );
    assert_eq!(
        stored.service_url.as_deref(),
        Some("http://127.0.0.1:18081")
    );
    // Refused: a plugin nobody knows, parameters without a plugin, a URL
    // without its scheme.
    for bad in [
        ClusterData {
            authentication_plugin: Some("kerberos".into()),
            ..ClusterData::default()
        },
        ClusterData {
            authentication_parameters: Some("token:x".into()),
            ..ClusterData::default()
        },
        ClusterData {
            service_url: Some("127.0.0.1:8080".into()),
            ..ClusterData::default()
        },
    ] {
        assert!(matches!(
            store.create_cluster("bad", &bad).await,
            Err(TenancyError::InvalidPolicy(_))
        ));
    }
    // Replication clusters: registered and allowed to the tenant.
    assert!(matches!(
        store
            .check_replication_clusters("public", &["mars".to_string()])
            .await,
        Err(TenancyError::UnknownCluster(_))
    ));
    assert!(matches!(
        store
            .check_replication_clusters("public", &["west".to_string()])
            .await,
        Err(TenancyError::ClusterNotAllowed { .. })
    ));
    let info = TenantInfo {
        admin_roles: Default::default(),
        allowed_clusters: ["east".to_string(), "west".to_string()].into(),
    };
    store
        .update_tenant("public", info.clone())
        .await
        .expect("tenant");
    store
        .check_replication_clusters("public", &["east".to_string(), "west".to_string()])
        .await
        .expect("allowed");
    let ns = NamespaceName::default_namespace();
    store
        .modify_policies(&ns, |p| {
            p.replication_clusters.insert("west".into());
            Ok(())
        })
        .await
        .expect("replicate");
    // The tenant no longer allows west, but a namespace still replicates
    // to it: the cluster stays.
    store
        .update_tenant(
            "public",
            TenantInfo {
                allowed_clusters: ["east".to_string()].into(),
                ..info
            },
        )
        .await
        .expect("tenant");
    assert!(matches!(
        store.delete_cluster("west").await,
        Err(TenancyError::NotEmpty(_))
    ));
    store
        .modify_policies(&ns, |p| {
            p.replication_clusters.remove("west");
            Ok(())
        })
        .await
        .expect("stop replicating");
    store.delete_cluster("west").await.expect("deleted");
}
