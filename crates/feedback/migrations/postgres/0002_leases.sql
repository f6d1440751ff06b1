-- An opened task reserves its item for that annotator until `lease_until` (unix ms), so
-- concurrent annotators are not all handed the same under-labelled items; submitting a
-- label ends the lease (NULL). Queue walks count live leases next to `label_count`.
ALTER TABLE assignments ADD COLUMN lease_until BIGINT;
CREATE INDEX assignments_item_lease ON assignments (item_id, lease_until);
CREATE INDEX assignments_user_lease ON assignments (user_id, lease_until);
CREATE INDEX assignments_user_item ON assignments (user_id, item_id);
