//! backbone
