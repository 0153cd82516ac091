-- The process that registered the agent, as it named itself (`instance` of the registration):
-- the same process registering again while its agent is live is answered with the agent (its
-- first reply was lost), another process meets `conflict`.
ALTER TABLE agents ADD COLUMN instance text;
