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
{{- with .Values.kafka.security }}
LOTFLOW_KAFKA_SECURITY_PROTOCOL: {{ .protocol | quote }}
{{- if hasPrefix "SASL_" .protocol }}
LOTFLOW_KAFKA_SASL_MECHANISM: {{ .mechanism | quote }}
{{- end }}
{{- if .caKey }}
LOTFLOW_KAFKA_SSL_CAFILE: {{ printf "%s/ca.crt" (trimSuffix "/" .caMountPath) | quote }}
{{- end }}
{{- end }}
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

{{/*
Kafka security: checks, the SASL credentials from the existing Secret (env entries; empty
for PLAINTEXT / SSL), and the CA bundle from the same Secret (volume + mount; empty without
caKey). Every pod that talks to Kafka, or reads the settings, includes all three.
*/}}
{{- define "lotflow.kafkaSecurityChecks" -}}
{{- $sec := .Values.kafka.security }}
{{- if and (hasPrefix "SASL_" $sec.protocol) (not $sec.existingSecret) }}
{{- fail (printf "kafka.security.protocol %s needs kafka.security.existingSecret (the Secret with the SASL username and password)" $sec.protocol) }}
{{- end }}
{{- if and $sec.caKey (not $sec.existingSecret) }}
{{- fail "kafka.security.caKey needs kafka.security.existingSecret (the Secret holding the CA bundle)" }}
{{- end }}
{{- if and $sec.caKey (not (hasSuffix "SSL" $sec.protocol)) }}
{{- fail (printf "kafka.security.caKey is only used with protocol SSL or SASL_SSL, not %s" $sec.protocol) }}
{{- end }}
{{- end }}

{{- define "lotflow.kafkaSecretEnv" -}}
{{- $sec := .Values.kafka.security }}
{{- if hasPrefix "SASL_" $sec.protocol -}}
- name: LOTFLOW_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $sec.existingSecret }}
      key: {{ $sec.usernameKey }}
- name: LOTFLOW_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sec.existingSecret }}
      key: {{ $sec.passwordKey }}
{{- end }}
{{- end }}

{{- define "lotflow.kafkaCaVolumeMount" -}}
{{- with .Values.kafka.security }}
{{- if .caKey -}}
- name: kafka-ca
  mountPath: {{ .caMountPath }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "lotflow.kafkaCaVolume" -}}
{{- with .Values.kafka.security }}
{{- if .caKey -}}
- name: kafka-ca
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0444
    items:
      - key: {{ .caKey }}
        path: ca.crt
{{- end }}
{{- end }}
{{- end }}
