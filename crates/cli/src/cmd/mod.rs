pub mod bench;
pub mod demo;
pub mod generate;
pub mod init;
pub mod pref;
pub mod rl;
pub mod sft;
