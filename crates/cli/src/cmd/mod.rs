pub mod bench;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod init;
pub mod pref;
pub mod sandbox;
pub mod sft;
