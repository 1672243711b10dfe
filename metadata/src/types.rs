//! The openraft type configuration of the metadata group.

use std::io::Cursor;

use openraft::{BasicNode, TokioRuntime};

use crate::state::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Raft types of the metadata store: commands are [`Command`]s, node ids
    /// are `u64`, and a node is known by its gRPC address.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
