//! Backbones, FS-CT / CTX / ProtoNet heads, the VIC regulariser, official-checkpoint import.
//! Single-process code: nothing here knows about ranks.
