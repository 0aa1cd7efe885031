// Azure infrastructure for the experiment-assignment worker, deployed into one resource group:
//
//   az deployment group create --resource-group <rg> \
//     --template-file deploy/azure/main.bicep \
//     --parameters deploy/azure/main.parameters.json \
//     --parameters containerImage=<registry>/ab-worker:<tag>
//
// Identity model: nothing here creates or outputs a key. Service Bus local (SAS) auth is off, the
// worker runs as a user-assigned managed identity with data-plane roles scoped to the one entity it
// touches, KEDA's queue-length reads use a second identity (see scalerIdentity), Application
// Insights takes Entra ID tokens only (appInsightsEntraAuthOnly), and operators get their own
// grants (operatorPrincipalId). docs/deployment.md walks through every parameter and output;
// tests/unit/test_deploy.py fails when that page names an entity, role or parameter this template
// does not create.
targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Lowercase letters and digits; prefixes every resource name.')
@minLength(3)
@maxLength(11)
param namePrefix string = 'abworker'

@description('Tags applied to every resource.')
param tags object = {}

@description('Service Bus namespace name (globally unique).')
param serviceBusNamespaceName string = 'sb-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Standard is enough for topics, duplicate detection and SQL filters; Premium adds isolation and private endpoints (privateEndpointSubnetId selects Premium by itself).')
@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string = 'Standard'

@description('Messaging units of a Premium namespace (1, 2, 4, 8 or 16); ignored on Standard.')
@allowed([
  1
  2
  4
  8
  16
])
param serviceBusPremiumCapacity int = 1

@description('Queue the assignment requests arrive on (AB_WORKER_QUEUE_NAME).')
param queueName string = 'assignment-requests'

@description('Topic the assignment events are published to (AB_WORKER_TOPIC_NAME).')
param topicName string = 'assignment-events'

@description('Experiment id selected by the example filtered subscription.')
param exampleFilterExperimentId string = 'exp_personalization_001'

@description('Queues the worker may send replies to (the request/reply pattern: a request whose reply_to names one gets its event there too). The worker gets Data Sender on each; empty for none.')
param replyQueueNames array = [
  'assignment-replies'
]

@description('How long the requests queue and the events topic remember message ids to drop repeats (ISO 8601, 20 s to 7 days). Publishers retrying a send and replays re-run after an interruption are dropped within it; a longer window costs some throughput.')
param duplicateDetectionWindow string = 'PT10M'

@description('Object id of the user, group or service principal that operates the worker (ab-worker dlq, queue, events tail, App Configuration edits); empty for none. A group is best.')
param operatorPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'Group'

@description('Log Analytics workspace name.')
param logAnalyticsName string = 'log-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Days of log and trace retention.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Application Insights component name.')
param appInsightsName string = 'appi-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Accept telemetry only with Entra ID tokens: the ingestion key stops working, so the connection string is no secret. The worker authenticates as its managed identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING) with Monitoring Metrics Publisher.')
param appInsightsEntraAuthOnly bool = true

@description('Resource id of an existing action group for the alert rules of deploy/dashboards/alerts.json; empty deploys no alerts.')
param alertActionGroupId string = ''

@description('Azure Data Explorer cluster name: 4-22 lowercase letters and digits, starting with a letter.')
@minLength(4)
@maxLength(22)
param kustoClusterName string = 'adx${namePrefix}${take(uniqueString(resourceGroup().id), 6)}'

@description('Cluster SKU. The default Dev SKU has no SLA and one node; use e.g. Standard_E2ads_v5 (tier Standard, capacity >= 2) in production.')
param kustoSkuName string = 'Dev(No SLA)_Standard_E2a_v4'

@allowed([
  'Basic'
  'Standard'
])
param kustoSkuTier string = 'Basic'

@minValue(1)
param kustoCapacity int = 1

@description('Database holding the AssignmentEvents table (AB_WORKER_KUSTO_DATABASE).')
param kustoDatabaseName string = 'assignments'

@description('Table the worker ingests into (AB_WORKER_KUSTO_TABLE); created by deploy/kusto/table.kql.')
param kustoTableName string = 'AssignmentEvents'

@description('Resource id of an existing subnet for private endpoints. Empty (default): Service Bus and Data Explorer keep public endpoints (Entra ID only, TLS 1.2). Set: both turn public network access off and are reached through private endpoints in this subnet, with private DNS zones linked to its virtual network; Service Bus becomes Premium (private endpoints need it) and containerAppsSubnetId is required.')
param privateEndpointSubnetId string = ''

@description('Resource id of an existing subnet (delegated to Microsoft.App/environments, /27 or larger) in the same virtual network, for the Container Apps environment; empty runs it outside any virtual network. Required with privateEndpointSubnetId.')
param containerAppsSubnetId string = ''

@description('Create an Azure App Configuration store to manage the experiments from (deploy/k8s-appconfig syncs it into the worker ConfigMap on AKS); the worker identity gets App Configuration Data Reader, the operator Data Owner.')
param appConfigurationEnabled bool = false

@description('App Configuration store name (globally unique).')
param appConfigurationName string = 'appcs-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Container Apps environment name.')
param containerAppsEnvironmentName string = 'cae-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Container app name.')
param containerAppName string = 'ca-${namePrefix}-worker'

@description('Worker image, e.g. myregistry.azurecr.io/ab-worker:0.1.0 (built from deploy/Dockerfile).')
param containerImage string

@description('Registry login server to pull the image with the worker identity (grant it AcrPull); empty for a public image.')
param registryServer string = ''

@description('vCPU per replica (one worker process uses about one core).')
param cpu string = '1.0'

@description('Memory per replica; Container Apps requires 2 GiB per vCPU on the Consumption profile.')
param memory string = '2Gi'

@minValue(0)
param minReplicas int = 1

@minValue(1)
param maxReplicas int = 20

@description('Queue messages per replica for the KEDA azure-servicebus rule; derive from measured per-replica throughput (see deploy/k8s/scaledobject.yaml).')
@minValue(1)
param scaleMessageCount int = 2000

// ---------------------------------------------------------------------------------------------
// Built-in role definition ids (stable across tenants)
// ---------------------------------------------------------------------------------------------

var roleIds = {
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataOwner: '090c5cfd-751d-490a-894a-3ce6f1109419'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  appConfigurationDataReader: '516239f1-63e1-4d78-a4de-a74fb236a071'
  appConfigurationDataOwner: '5ae67dd6-50cb-40e7-96ff-dc2bfa4b606b'
}

var hasOperator = !empty(operatorPrincipalId)
var privateNetworking = !empty(privateEndpointSubnetId)
// /subscriptions/<s>/resourceGroups/<g>/providers/Microsoft.Network/virtualNetworks/<v>/subnets/<n>
var virtualNetworkId = privateNetworking ? join(take(split(privateEndpointSubnetId, '/'), 9), '/') : ''
var effectiveServiceBusSku = privateNetworking ? 'Premium' : serviceBusSku

// Applied in order; each file must be idempotent (.create-merge / .create-or-alter), because the
// script runs again whenever its content changes. Commands are separated by blank lines.
var kustoSchemaFiles = [
  loadTextContent('../kusto/table.kql')
  loadTextContent('../kusto/mapping.kql')
  loadTextContent('../kusto/retention.kql')
  loadTextContent('../kusto/functions.kql')
]
var kustoSchemaScript = join(kustoSchemaFiles, '\n\n')

// ---------------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------------

// The worker: receives from the requests queue, sends to the events topic, ingests into Kusto.
resource workerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${namePrefix}-worker'
  location: location
  tags: tags
}

// The autoscaler: reading a queue's message count is a management read that Service Bus grants
// only with the Manage right (RBAC: Data Owner). Keeping it off the worker's identity means the
// worker cannot create, delete or purge entities; it is scoped to the requests queue alone.
resource scalerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${namePrefix}-scaler'
  location: location
  tags: tags
}

// ---------------------------------------------------------------------------------------------
// Service Bus
// ---------------------------------------------------------------------------------------------

resource serviceBus 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: serviceBusNamespaceName
  location: location
  tags: tags
  sku: {
    name: effectiveServiceBusSku
    tier: effectiveServiceBusSku
    capacity: effectiveServiceBusSku == 'Premium' ? serviceBusPremiumCapacity : null
  }
  properties: {
    // Entra ID only: no SAS key exists that could leak.
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
  }
}

resource requestsQueue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: serviceBus
  name: queueName
  properties: {
    // Longer than a batch takes end to end; the SDK renews locks for slower batches.
    lockDuration: 'PT1M'
    // Poison messages reach the dead-letter queue after 10 tries instead of cycling for ever.
    maxDeliveryCount: 10
    // An expired request is kept for inspection and replay rather than silently dropped.
    deadLetteringOnMessageExpiration: true
    // A publisher that retries a send after a timeout (the first send may have arrived) would
    // otherwise have its request assigned twice. Publishers set a MessageId per request; replays
    // get ids of their own (<original>/replay-<n>-<digest>), so this never drops a replay.
    // Service Bus fixes this at creation: an existing queue without it must be recreated.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
  }
}

// Where requesters that set reply_to read their events (the request/reply pattern).
resource replyQueues 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = [
  for name in replyQueueNames: {
    parent: serviceBus
    name: name
    properties: {
      lockDuration: 'PT1M'
      maxDeliveryCount: 10
      // A reply nobody read in a day is of no use to its requester.
      defaultMessageTimeToLive: 'P1D'
      deadLetteringOnMessageExpiration: false
    }
  }
]

resource eventsTopic 'Microsoft.ServiceBus/namespaces/topics@2024-01-01' = {
  parent: serviceBus
  name: topicName
  properties: {
    // Events carry a deterministic MessageId (the event id), so a redelivered request's republished
    // event is dropped here; the window must exceed the longest redelivery delay.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
  }
}

// For watching: `ab-worker events tail` reads it by default. It keeps every event (no rule but the
// $Default match-all), so a day's TTL keeps an unread one from filling the namespace.
resource allSubscription 'Microsoft.ServiceBus/namespaces/topics/subscriptions@2024-01-01' = {
  parent: eventsTopic
  name: 'all'
  properties: {
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    defaultMessageTimeToLive: 'P1D'
    deadLetteringOnMessageExpiration: false
  }
}

// An example of a consumer's own subscription, an audit trail of every event; a consumer's dead
// letters are inspected and replayed with `ab-worker dlq ... --entity assignment-events/Subscriptions/audit`.
resource auditSubscription 'Microsoft.ServiceBus/namespaces/topics/subscriptions@2024-01-01' = {
  parent: eventsTopic
  name: 'audit'
  properties: {
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
  }
}

// An example consumer that only wants one experiment. The worker stamps experiment_id as an
// application property on every event, which SQL filters can read.
resource exampleSubscription 'Microsoft.ServiceBus/namespaces/topics/subscriptions@2024-01-01' = {
  parent: eventsTopic
  name: 'personalization'
  properties: {
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
  }
}

// Named $Default on purpose: Service Bus gives every new subscription a $Default rule that
// matches everything, and rules are OR-ed, so an additional rule would filter nothing.
resource exampleSubscriptionFilter 'Microsoft.ServiceBus/namespaces/topics/subscriptions/rules@2024-01-01' = {
  parent: exampleSubscription
  name: '$Default'
  properties: {
    filterType: 'SqlFilter'
    sqlFilter: {
      sqlExpression: 'experiment_id = \'${exampleFilterExperimentId}\''
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Monitoring
// ---------------------------------------------------------------------------------------------

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

// Workspace-based: traces, metrics and container logs land in one workspace and one query surface.
resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'other'
  properties: {
    Application_Type: 'other'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: appInsightsEntraAuthOnly
  }
}

// deploy/dashboards/assignment-workbook.json, with its Kusto cluster and database defaulting to
// this deployment's (the file's defaults are placeholders, each present exactly once: a test checks).
var workbookTemplate = loadTextContent('../dashboards/assignment-workbook.json')
var workbookWithCluster = replace(workbookTemplate, 'https://mycluster.westeurope.kusto.windows.net', kusto.properties.uri)
var workbookContent = replace(workbookWithCluster, '"value": "assignments"', '"value": "${kustoDatabaseName}"')

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, 'ab-worker-assignment-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'A/B assignment worker'
    category: 'workbook'
    sourceId: appInsights.id
    serializedData: workbookContent
  }
}

// deploy/dashboards/alerts.json as a module. The SRM rule queries Data Explorer with its own
// system-assigned identity: grant it Viewer on the database once (docs/deployment.md).
module alerts '../dashboards/alerts.json' = if (!empty(alertActionGroupId)) {
  name: 'ab-worker-alerts'
  params: {
    location: location
    serviceBusNamespaceId: serviceBus.id
    queueName: requestsQueue.name
    appInsightsId: appInsights.id
    kustoDatabaseUri: '${kusto.properties.uri}/${kustoDatabase.name}'
    actionGroupId: alertActionGroupId
  }
}

// ---------------------------------------------------------------------------------------------
// Azure Data Explorer
// ---------------------------------------------------------------------------------------------

resource kusto 'Microsoft.Kusto/clusters@2023-08-15' = {
  name: kustoClusterName
  location: location
  tags: tags
  sku: {
    name: kustoSkuName
    tier: kustoSkuTier
    capacity: kustoCapacity
  }
  // checkov:skip=CKV_AZURE_75: double encryption can only be chosen at creation, can never be undone and costs throughput; storage is already encrypted at rest by the platform, and disk encryption is on
  properties: {
    // Without private endpoints the cluster answers on its public endpoint (Entra ID only): Container
    // Apps on the Consumption profile has no fixed egress address to allow-list.
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
    // Encrypts the cluster's VM disks (caches, temporary data) too; a single-digit performance cost.
    enableDiskEncryption: true
  }
}

resource kustoDatabase 'Microsoft.Kusto/clusters/databases@2023-08-15' = {
  parent: kusto
  name: kustoDatabaseName
  location: location
  kind: 'ReadWrite'
  properties: {
    // Table-level retention in retention.kql narrows this for AssignmentEvents.
    softDeletePeriod: 'P365D'
    hotCachePeriod: 'P31D'
  }
}

// One script rather than four: the service runs only one script operation per database at a time.
resource kustoSchema 'Microsoft.Kusto/clusters/databases/scripts@2023-08-15' = {
  parent: kustoDatabase
  name: 'assignment-events-schema'
  properties: {
    scriptContent: kustoSchemaScript
    // Re-run exactly when the files change.
    forceUpdateTag: uniqueString(kustoSchemaScript)
    continueOnErrors: false
  }
}

// Database Ingestor: may ingest, may not query or change the schema.
resource kustoIngestor 'Microsoft.Kusto/clusters/databases/principalAssignments@2023-08-15' = {
  parent: kustoDatabase
  name: guid(kustoDatabase.id, workerIdentity.id, 'Ingestor')
  properties: {
    principalId: workerIdentity.properties.clientId
    principalType: 'App'
    role: 'Ingestor'
    tenantId: tenant().tenantId
  }
  // Serialised after the script: concurrent control operations on one database conflict.
  dependsOn: [
    kustoSchema
  ]
}

// ---------------------------------------------------------------------------------------------
// Private endpoints (only with privateEndpointSubnetId)
// ---------------------------------------------------------------------------------------------

// Each zone resolves the service's public host name to its private endpoint inside the virtual
// network. Data Explorer needs four: the engine and its ingestion storage (blob, queue, table).
var serviceBusDnsZone = 'privatelink.servicebus.windows.net'
var kustoDnsZones = [
  'privatelink.${location}.kusto.windows.net'
  'privatelink.blob.${environment().suffixes.storage}'
  'privatelink.queue.${environment().suffixes.storage}'
  'privatelink.table.${environment().suffixes.storage}'
]
var privateDnsZoneNames = concat([serviceBusDnsZone], kustoDnsZones)

resource privateDnsZones 'Microsoft.Network/privateDnsZones@2024-06-01' = [
  for zone in privateDnsZoneNames: if (privateNetworking) {
    name: zone
    location: 'global'
    tags: tags
  }
]

resource privateDnsLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2024-06-01' = [
  for (zone, i) in privateDnsZoneNames: if (privateNetworking) {
    parent: privateDnsZones[i]
    name: 'ab-worker'
    location: 'global'
    tags: tags
    properties: {
      virtualNetwork: {
        id: virtualNetworkId
      }
      registrationEnabled: false
    }
  }
]

resource serviceBusPrivateEndpoint 'Microsoft.Network/privateEndpoints@2024-05-01' = if (privateNetworking) {
  name: 'pe-${serviceBus.name}'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    privateLinkServiceConnections: [
      {
        name: 'namespace'
        properties: {
          privateLinkServiceId: serviceBus.id
          groupIds: [
            'namespace'
          ]
        }
      }
    ]
  }
}

resource serviceBusPrivateDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-05-01' = if (privateNetworking) {
  parent: serviceBusPrivateEndpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: 'servicebus'
        properties: {
          privateDnsZoneId: privateDnsZones[0].id
        }
      }
    ]
  }
}

resource kustoPrivateEndpoint 'Microsoft.Network/privateEndpoints@2024-05-01' = if (privateNetworking) {
  name: 'pe-${kusto.name}'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: privateEndpointSubnetId
    }
    privateLinkServiceConnections: [
      {
        name: 'cluster'
        properties: {
          privateLinkServiceId: kusto.id
          groupIds: [
            'cluster'
          ]
        }
      }
    ]
  }
}

resource kustoPrivateDns 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-05-01' = if (privateNetworking) {
  parent: kustoPrivateEndpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      for (zone, i) in kustoDnsZones: {
        name: replace(zone, '.', '-')
        properties: {
          privateDnsZoneId: privateDnsZones[i + 1].id
        }
      }
    ]
  }
}

// ---------------------------------------------------------------------------------------------
// Azure App Configuration (only with appConfigurationEnabled)
// ---------------------------------------------------------------------------------------------

// Holds the key "experiments" (the experiments list as JSON); docs/deployment.md seeds it. This
// template never writes the key itself, so a redeployment cannot undo an operator's edit.
resource appConfiguration 'Microsoft.AppConfiguration/configurationStores@2024-05-01' = if (appConfigurationEnabled) {
  name: appConfigurationName
  location: location
  tags: tags
  sku: {
    name: 'standard'
  }
  properties: {
    // Entra ID only, like Service Bus.
    disableLocalAuth: true
    // Keeps deleted stores recoverable for a week, so a mistaken delete does not lose the experiments.
    softDeleteRetentionInDays: 7
    enablePurgeProtection: true
  }
}

// ---------------------------------------------------------------------------------------------
// Least-privilege role assignments
// ---------------------------------------------------------------------------------------------

resource workerReceivesRequests 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(requestsQueue.id, workerIdentity.id, roleIds.serviceBusDataReceiver)
  scope: requestsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataReceiver)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerSendsEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(eventsTopic.id, workerIdentity.id, roleIds.serviceBusDataSender)
  scope: eventsTopic
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataSender)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The request/reply pattern: the worker sends a request's event to the queue its reply_to names.
resource workerSendsReplies 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (name, i) in replyQueueNames: {
    name: guid(replyQueues[i].id, workerIdentity.id, roleIds.serviceBusDataSender)
    scope: replyQueues[i]
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataSender)
      principalId: workerIdentity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource scalerReadsQueueLength 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(requestsQueue.id, scalerIdentity.id, roleIds.serviceBusDataOwner)
  scope: requestsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataOwner)
    principalId: scalerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workerReadsExperiments 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (appConfigurationEnabled) {
  name: guid(appConfiguration.id, workerIdentity.id, roleIds.appConfigurationDataReader)
  scope: appConfiguration
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.appConfigurationDataReader)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The operator's grants. `dlq peek/export/purge` and `queue peek/dead-letter` receive from the
// requests queue (and its dead-letter queue); `dlq replay` also sends back to it. On the topic,
// Receiver covers `events tail` and every subscription's dead-letter queue, Sender the replay of a
// subscription's dead letters (Service Bus sends to a topic, never to one subscription). Reply
// queues are read with `queue peek --entity`. Nothing here can create, delete or reconfigure an entity.
resource operatorOnRequests 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in ['serviceBusDataReceiver', 'serviceBusDataSender']: if (hasOperator) {
    name: guid(requestsQueue.id, operatorPrincipalId, roleIds[role])
    scope: requestsQueue
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[role])
      principalId: operatorPrincipalId
      principalType: operatorPrincipalType
    }
  }
]

resource operatorOnEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in ['serviceBusDataReceiver', 'serviceBusDataSender']: if (hasOperator) {
    name: guid(eventsTopic.id, operatorPrincipalId, roleIds[role])
    scope: eventsTopic
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[role])
      principalId: operatorPrincipalId
      principalType: operatorPrincipalType
    }
  }
]

resource operatorReadsReplies 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (name, i) in replyQueueNames: if (hasOperator) {
    name: guid(replyQueues[i].id, operatorPrincipalId, roleIds.serviceBusDataReceiver)
    scope: replyQueues[i]
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataReceiver)
      principalId: operatorPrincipalId
      principalType: operatorPrincipalType
    }
  }
]

resource operatorEditsExperiments 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (hasOperator && appConfigurationEnabled) {
  name: guid(appConfiguration.id, operatorPrincipalId, roleIds.appConfigurationDataOwner)
  scope: appConfiguration
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.appConfigurationDataOwner)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

// Needed only when the ingestion key is disabled and telemetry is sent with an Entra ID token.
resource workerPublishesTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (appInsightsEntraAuthOnly) {
  name: guid(appInsights.id, workerIdentity.id, roleIds.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
    principalId: workerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---------------------------------------------------------------------------------------------
// Container Apps
// ---------------------------------------------------------------------------------------------

resource containerAppsEnvironment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: containerAppsEnvironmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logAnalytics.properties.customerId
        sharedKey: logAnalytics.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
    // In a virtual network (needed to reach private endpoints): internal, since nothing calls in.
    vnetConfiguration: empty(containerAppsSubnetId) ? null : {
      infrastructureSubnetId: containerAppsSubnetId
      internal: true
    }
  }
}

// The namespace host name without assuming the public cloud's DNS suffix.
var serviceBusHost = split(split(serviceBus.properties.serviceBusEndpoint, '//')[1], ':')[0]

var registries = empty(registryServer) ? [] : [
  {
    server: registryServer
    identity: workerIdentity.id
  }
]

resource workerApp 'Microsoft.App/containerApps@2025-01-01' = {
  name: containerAppName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${workerIdentity.id}': {}
      '${scalerIdentity.id}': {}
    }
  }
  properties: {
    managedEnvironmentId: containerAppsEnvironment.id
    workloadProfileName: 'Consumption'
    configuration: {
      activeRevisionsMode: 'Single'
      // No ingress: the worker pulls work from Service Bus; its health port is probed in-environment.
      registries: registries
      // deploy/experiments.yaml, read at deployment. A running replica never sees a new secret value:
      // NO hot reload on Container Apps. Redeploy, then start a new revision (docs/deployment.md).
      secrets: [
        {
          name: 'experiments-yaml'
          value: loadTextContent('../experiments.yaml')
        }
      ]
    }
    template: {
      // Exceeds AB_WORKER_DRAIN_DEADLINE so the drain completes before the replica is killed.
      terminationGracePeriodSeconds: 30
      containers: [
        {
          name: 'worker'
          image: containerImage
          args: [
            'run'
          ]
          resources: {
            cpu: json(cpu)
            memory: memory
          }
          env: concat([
            // Two identities are attached, so DefaultAzureCredential must be told which one is the worker's.
            {
              name: 'AZURE_CLIENT_ID'
              value: workerIdentity.properties.clientId
            }
            {
              name: 'AB_WORKER_SERVICEBUS_NAMESPACE'
              value: serviceBusHost
            }
            {
              name: 'AB_WORKER_QUEUE_NAME'
              value: requestsQueue.name
            }
            {
              name: 'AB_WORKER_TOPIC_NAME'
              value: eventsTopic.name
            }
            {
              name: 'AB_WORKER_EXPERIMENTS_FILE'
              value: '/etc/ab-worker/experiments.yaml'
            }
            {
              name: 'AB_WORKER_KUSTO_INGEST_URI'
              value: kusto.properties.dataIngestionUri
            }
            {
              name: 'AB_WORKER_KUSTO_DATABASE'
              value: kustoDatabase.name
            }
            {
              name: 'AB_WORKER_KUSTO_TABLE'
              value: kustoTableName
            }
            {
              name: 'AB_WORKER_TELEMETRY'
              value: 'appinsights'
            }
            {
              name: 'AB_WORKER_HEALTH_PORT'
              value: '8080'
            }
            {
              name: 'AB_WORKER_DRAIN_DEADLINE'
              value: '25'
            }
            // Not a secret once the ingestion key is off (appInsightsEntraAuthOnly): it only names
            // the resource and its ingestion endpoint.
            {
              name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
              value: appInsights.properties.ConnectionString
            }
          ], appInsightsEntraAuthOnly ? [
            // The Azure Monitor exporter takes an Entra ID token as this identity (two are attached).
            {
              name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
              value: 'Authorization=AAD;ClientId=${workerIdentity.properties.clientId}'
            }
          ] : [])
          probes: [
            {
              type: 'Startup'
              httpGet: {
                path: '/healthz'
                port: 8080
              }
              periodSeconds: 2
              failureThreshold: 30
            }
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: 8080
              }
              periodSeconds: 10
              failureThreshold: 3
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: 8080
              }
              periodSeconds: 5
              failureThreshold: 2
            }
          ]
          volumeMounts: [
            {
              volumeName: 'experiments'
              mountPath: '/etc/ab-worker'
            }
          ]
        }
      ]
      // A secret volume: read when a replica starts (see the secrets above).
      volumes: [
        {
          name: 'experiments'
          storageType: 'Secret'
          secrets: [
            {
              // checkov:skip=CKV_SECRET_6: not a credential: the secret holds deploy/experiments.yaml (public configuration); the scanner flags the word secretRef
              secretRef: 'experiments-yaml'
              path: 'experiments.yaml'
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        rules: [
          {
            name: 'requests-queue-depth'
            custom: {
              type: 'azure-servicebus'
              metadata: {
                namespace: serviceBus.name
                queueName: requestsQueue.name
                messageCount: string(scaleMessageCount)
                activationMessageCount: '1'
              }
              identity: scalerIdentity.id
            }
          }
        ]
      }
    }
  }
  // The first revision starts only once its identities can actually reach Service Bus and Kusto.
  dependsOn: [
    workerReceivesRequests
    workerSendsEvents
    workerSendsReplies
    scalerReadsQueueLength
    workerPublishesTelemetry
    kustoIngestor
  ]
}

// ---------------------------------------------------------------------------------------------
// Outputs (no secrets): what deploy/k8s needs when running on AKS instead of Container Apps
// ---------------------------------------------------------------------------------------------

output serviceBusNamespaceHost string = serviceBusHost
output serviceBusNamespaceName string = serviceBus.name
output kustoIngestUri string = kusto.properties.dataIngestionUri
output kustoClusterUri string = kusto.properties.uri
output kustoDatabaseName string = kustoDatabase.name
output workerIdentityClientId string = workerIdentity.properties.clientId
output workerIdentityPrincipalId string = workerIdentity.properties.principalId
output scalerIdentityClientId string = scalerIdentity.properties.clientId
output appInsightsName string = appInsights.name
// Not a secret with appInsightsEntraAuthOnly (the default): the ingestion key it carries is refused.
output appInsightsConnectionString string = appInsightsEntraAuthOnly ? appInsights.properties.ConnectionString : ''
output appConfigurationEndpoint string = appConfigurationEnabled ? appConfiguration.properties.endpoint : ''
output workbookId string = workbook.id
output containerAppName string = workerApp.name
