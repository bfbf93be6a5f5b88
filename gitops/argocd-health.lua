-- Argo CD health check for agentops.dev/AgentExecution.
-- Install under argocd-cm: resource.customizations.health.agentops.dev_AgentExecution
hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller"
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or phase
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to see the latest spec"
  return hs
end
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" or phase == "TimedOut" or phase == "Cancelled" then
  hs.status = "Degraded"
elseif phase == "Pending" then
  -- Pending with Stalled=True is a bad reference (missing template or Secret).
  hs.status = "Progressing"
  for _, c in ipairs(obj.status.conditions or {}) do
    if c.type == "Stalled" and c.status == "True" then
      hs.status = "Degraded"
    end
  end
else
  -- Queued, Running
  hs.status = "Progressing"
end
hs.message = phase .. ": " .. message
return hs
