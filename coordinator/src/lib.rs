//! The Tandem coordinator: topics and publishing, consumer groups,
//! transactional messages and check-back, the saga driver.
