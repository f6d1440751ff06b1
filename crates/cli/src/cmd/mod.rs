pub mod bench;
pub mod generate;
pub mod init;
pub mod sft;
