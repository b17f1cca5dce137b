//! The AWS deployment (issue 3): placeholder.
