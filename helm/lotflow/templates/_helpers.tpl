{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "lotflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name; the release name alone when it already contains the chart name.
*/}}
{{- define "lotflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lotflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels (immutable on Deployments: never add to these).
*/}}
{{- define "lotflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lotflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "lotflow.labels" -}}
helm.sh/chart: {{ include "lotflow.chart" . }}
{{ include "lotflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lotflow
{{- end }}

{{/*
Container image.
*/}}
{{- define "lotflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Non-secret LOTFLOW_* settings as a YAML map of strings. The ConfigMap carries them for
the Deployments; the pre-install hook Job gets them inline, because hooks run before the
release's ConfigMap exists.
*/}}
{{- define "lotflow.config" -}}
LOTFLOW_BOOTSTRAP_SERVERS: {{ required "kafka.bootstrapServers is required" .Values.kafka.bootstrapServers | quote }}
{{- with .Values.kafka.schemaRegistryUrl }}
LOTFLOW_SCHEMA_REGISTRY_URL: {{ . | quote }}
{{- end }}
LOTFLOW_TOPIC_PREFIX: {{ .Values.kafka.topicPrefix | quote }}
LOTFLOW_PARTITIONS: {{ .Values.kafka.partitions | toString | quote }}
LOTFLOW_REPLICATION_FACTOR: {{ .Values.kafka.replicationFactor | toString | quote }}
LOTFLOW_APP_ID: {{ .Values.appId | quote }}
LOTFLOW_VAR_DIR: {{ .Values.varDir | quote }}
LOTFLOW_DOCUMENT_WAIT_S: {{ .Values.receiving.documentWaitSeconds | toString | quote }}
LOTFLOW_RECEIVING_VERIFY_THRESHOLD: {{ .Values.receiving.verifyThreshold | toString | quote }}
LOTFLOW_RECEIVING_HIGH_PRIORITY_THRESHOLD: {{ .Values.receiving.highPriorityThreshold | toString | quote }}
LOTFLOW_CLICKHOUSE_DATABASE: {{ .Values.clickhouse.database | quote }}
LOTFLOW_WORKER_WEB_HOST: "0.0.0.0"
LOTFLOW_WORKER_WEB_PORT: {{ .Values.worker.metricsPort | toString | quote }}
LOTFLOW_SINK_METRICS_HOST: "0.0.0.0"
LOTFLOW_SINK_METRICS_PORT: {{ .Values.sink.metricsPort | toString | quote }}
{{- range $key, $value := .Values.config.extra }}
{{- if not (hasPrefix "LOTFLOW_" $key) }}
{{- fail (printf "config.extra.%s: only LOTFLOW_* variables belong here" $key) }}
{{- end }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
The ClickHouse DSN from the existing Secret.
*/}}
{{- define "lotflow.clickhouseDsnEnv" -}}
- name: LOTFLOW_CLICKHOUSE_DSN
  valueFrom:
    secretKeyRef:
      name: {{ required "clickhouse.existingSecret is required" .Values.clickhouse.existingSecret }}
      key: {{ .Values.clickhouse.dsnKey }}
{{- end }}

{{/*
Pod-level settings shared by every pod of the chart.
*/}}
{{- define "lotflow.podCommon" -}}
automountServiceAccountToken: false
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}
