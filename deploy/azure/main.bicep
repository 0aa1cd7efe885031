// Azure infrastructure for the experiment-assignment worker, deployed into one resource group:
//
//   az deployment group create --resource-group <rg> \
//     --template-file deploy/azure/main.bicep \
//     --parameters deploy/azure/main.parameters.json \
//     --parameters containerImage=<registry>/ab-worker:<tag>
//
// Identity model: nothing here creates or outputs a key. Service Bus local (SAS) auth is off, the
// worker runs as a user-assigned managed identity with data-plane roles scoped to the one entity it
// touches, and KEDA's queue-length reads use a second identity (see scalerIdentity).
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

@description('Standard is enough for topics, duplicate detection and SQL filters; Premium adds isolation and private endpoints.')
@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string = 'Standard'

@description('Queue the assignment requests arrive on (AB_WORKER_QUEUE_NAME).')
param queueName string = 'assignment-requests'

@description('Topic the assignment events are published to (AB_WORKER_TOPIC_NAME).')
param topicName string = 'assignment-events'

@description('Experiment id selected by the example filtered subscription.')
param exampleFilterExperimentId string = 'exp_personalization_001'

@description('Log Analytics workspace name.')
param logAnalyticsName string = 'log-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Days of log and trace retention.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Application Insights component name.')
param appInsightsName string = 'appi-${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Accept telemetry only with Entra ID tokens (no ingestion key). The worker must then pass its managed identity credential to the Azure Monitor exporter.')
param appInsightsEntraAuthOnly bool = false

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
}

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
    name: serviceBusSku
    tier: serviceBusSku
  }
  properties: {
    // Entra ID only: no SAS key exists that could leak.
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
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
  }
}

resource eventsTopic 'Microsoft.ServiceBus/namespaces/topics@2024-01-01' = {
  parent: serviceBus
  name: topicName
  properties: {
    // Events carry a deterministic MessageId (the event id), so a redelivered request's republished
    // event is dropped here; the window must exceed the longest redelivery delay.
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT10M'
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
  properties: {
    // Container Apps on the Consumption profile has no fixed egress address to allow-list; put
    // the cluster behind a private endpoint with a VNet-integrated environment to close this.
    publicNetworkAccess: 'Enabled'
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

resource scalerReadsQueueLength 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(requestsQueue.id, scalerIdentity.id, roleIds.serviceBusDataOwner)
  scope: requestsQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.serviceBusDataOwner)
    principalId: scalerIdentity.properties.principalId
    principalType: 'ServicePrincipal'
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
      secrets: [
        {
          name: 'experiments-yaml'
          value: loadTextContent('../experiments.yaml')
        }
        {
          name: 'appinsights-connection-string'
          value: appInsights.properties.ConnectionString
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
          env: [
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
            {
              name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
              secretRef: 'appinsights-connection-string'
            }
          ]
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
      // Secret volumes change only with a new revision here; to change experiments without a
      // restart, mount an Azure Files share at /etc/ab-worker instead and hot reload picks it up.
      volumes: [
        {
          name: 'experiments'
          storageType: 'Secret'
          secrets: [
            {
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
    scalerReadsQueueLength
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
output containerAppName string = workerApp.name
