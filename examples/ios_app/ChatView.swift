// ChatView.swift: a minimal SwiftUI screen on top of the generated MLXKitBundle.swift.
// Written against the default Swift runtime of mlxkit bundles, mlx-swift-lm 1441444 (a
// main-branch commit: `--swift-runtime 1441444`); a bundle built with `--swift-runtime 3.31.4`
// has no drafter, and this file's drafter code does not compile against it. Not compiled here
// (no iOS toolchain): parsed, and its mlx-swift-lm names, labels and imports checked against the
// table read from mlx-swift-lm's source (tests/swift_api.toml); see docs/verification.md.
//
// A photo from the PhotosPicker goes with the prompt when the bundle's container reads images
// (model/ holds the MLX vision tower), resized to the size the memory plan made room for. A
// bundle built with `--vision-encoder coreml` answers text only: MLX Swift cannot take the Core
// ML encoder's output yet (mlx-swift-lm's Qwen35 needs a public entry that takes precomputed
// image features; the bundle's README says more). At temperature 0 it decodes with the MTP
// drafter when the bundle has one that the plan recommends (manifest.json → mtp.recommended:
// otherwise `loadDrafter` returns nil) and the prompt is within the planned prefill chunk, and
// shows tokens/s and how many drafts were accepted.
//
// "Answer in JSON" decodes the answer under the bundle's JSON Schema with mlx-swift-lm's guided
// generation, through the glue's `generateJSON`. That method (and its import of
// MLXGuidedGeneration, a package product the app adds) is generated only for bundles built with
// `--json-schema FILE`: with another bundle, delete `sendJSON` and the toggle.

import CoreImage
import MLX  // MLXArray.size
import MLXHuggingFace
import MLXLLM
import MLXLMCommon
import PhotosUI
import SwiftUI
import Tokenizers  // #huggingFaceTokenizerLoader() expands to Tokenizers.AutoTokenizer

@MainActor
@Observable
final class ChatModel {
    var status = "Not loaded"
    var reply = ""
    var stats = ""
    var temperature: Float = 0
    var answersInJSON = false
    private var loaded: MLXKitLoaded?
    private var drafter: MTPDrafterContainer?

    var readsImages: Bool { loaded?.readsImages ?? false }
    var hasJSONSchema: Bool { loaded?.jsonSchema != nil }

    func load() async {
        guard let url = MLXKitBundle.locate() else {
            status = "The model has not been downloaded yet."
            return
        }
        do {
            let bundle = try await MLXKitBundle.load(from: url, using: #huggingFaceTokenizerLoader())
            drafter = try await MLXKitBundle.loadDrafter(
                bundle, using: #huggingFaceTokenizerLoader())
            loaded = bundle
            if !bundle.check.deviceListed {
                status = "Loaded (this device, \(bundle.check.deviceModel), was not in the plan)"
            } else {
                status = "Loaded"
            }
        } catch {
            status = error.localizedDescription
        }
    }

    func send(_ prompt: String, image: CIImage? = nil) async {
        guard let loaded else { return }
        reply = ""
        stats = ""
        // a picture only when the container reads images (model/ holds the vision tower)
        let picture = loaded.readsImages ? image : nil
        let processing =
            picture.map {
                loaded.imageProcessing(width: Int($0.extent.width), height: Int($0.extent.height))
            } ?? UserInput.Processing()
        let temperature = temperature
        do {
            let stream: AsyncStream<Generation>
            if let drafter, temperature == 0 {
                // generate(…, mtpDrafter:) takes the `any MTPDrafterModel` inside the drafter's
                // container, handed to the model's container as a non-Sendable value
                stream = try await drafter.perform { drafterContext in
                    try await loaded.container.perform(nonSendable: drafterContext.model) {
                        context, mtpDrafter in
                        let images: [UserInput.Image] = picture.map { [.ciImage($0)] } ?? []
                        let input = try await context.processor.prepare(
                            input: UserInput(
                                chat: [.user(prompt, images: images)], processing: processing))
                        var parameters = loaded.parameters
                        parameters.temperature = temperature
                        let promptTokens = input.text.tokens.size
                        parameters.maxTokens = loaded.maxNewTokens(promptTokens: promptTokens)
                        if loaded.decodesWithDrafter(
                            temperature: temperature, promptTokens: promptTokens)
                        {
                            return try MLXLMCommon.generate(
                                input: input, parameters: parameters, context: context,
                                mtpDrafter: mtpDrafter, blockSize: 2)
                        }
                        return try MLXLMCommon.generate(
                            input: input, parameters: parameters, context: context)
                    }
                }
            } else {
                stream = try await loaded.container.perform { context in
                    let images: [UserInput.Image] = picture.map { [.ciImage($0)] } ?? []
                    let input = try await context.processor.prepare(
                        input: UserInput(
                            chat: [.user(prompt, images: images)], processing: processing))
                    var parameters = loaded.parameters
                    parameters.temperature = temperature
                    // stay within the context the memory plan was made for
                    parameters.maxTokens = loaded.maxNewTokens(
                        promptTokens: input.text.tokens.size)
                    return try MLXLMCommon.generate(
                        input: input, parameters: parameters, context: context)
                }
            }
            for await event in stream {
                if let chunk = event.chunk {
                    reply += chunk
                }
                if let info = event.info {
                    stats = Self.describe(info)
                }
            }
        } catch {
            status = error.localizedDescription
        }
    }

    /// The answer as JSON valid under the bundle's schema (guided generation: thinking off, no
    /// drafter, text only), shown when it is complete.
    func sendJSON(_ prompt: String) async {
        guard let loaded else { return }
        reply = ""
        stats = ""
        do {
            // perform's closure runs off the main actor: the schema's first compile blocks
            reply = try await loaded.container.perform { context in
                let input = try await context.processor.prepare(
                    input: UserInput(
                        chat: [.user(prompt)], additionalContext: ["enable_thinking": false]))
                var output = ""
                try loaded.generateJSON(
                    input: input, context: context,
                    maxTokens: loaded.maxNewTokens(promptTokens: input.text.tokens.size)
                ) { delta in
                    output += delta
                    return true
                }
                return output
            }
        } catch {
            status = error.localizedDescription
        }
    }

    /// "12.3 tokens/s; drafts accepted 40 of 52 (77%)", or without the drafts part when the
    /// request decoded without the drafter.
    static func describe(_ info: GenerateCompletionInfo) -> String {
        var text = String(format: "%.1f tokens/s", info.tokensPerSecond)
        if let proposed = info.proposedDraftTokens, let accepted = info.acceptedDraftTokens,
            proposed > 0
        {
            let share = Int((Double(accepted) / Double(proposed) * 100).rounded())
            text += "; drafts accepted \(accepted) of \(proposed) (\(share)%)"
        }
        return text
    }
}

struct ChatView: View {
    @State private var model = ChatModel()
    @State private var prompt = ""
    @State private var photo: PhotosPickerItem?
    @State private var image: CIImage?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Text(model.status).font(.caption)
            ScrollView { Text(model.reply).frame(maxWidth: .infinity, alignment: .leading) }
            Text(model.stats).font(.caption)
            if model.readsImages {
                PhotosPicker(selection: $photo, matching: .images) {
                    Text(image == nil ? "Add a photo" : "Photo added")
                }
            }
            if model.hasJSONSchema {
                Toggle("Answer in JSON", isOn: $model.answersInJSON)
            }
            HStack {
                TextField("Ask something", text: $prompt)
                Button("Send") {
                    Task {
                        if model.answersInJSON {
                            await model.sendJSON(prompt)
                        } else {
                            await model.send(prompt, image: image)
                        }
                    }
                }
            }
        }
        .padding()
        .task { await model.load() }
        .onChange(of: photo) { _, item in
            Task { image = await Self.picture(item) }
        }
    }

    /// The picked photo as a CIImage (nil when there is none or it cannot be read).
    static func picture(_ item: PhotosPickerItem?) async -> CIImage? {
        guard let item, let data = try? await item.loadTransferable(type: Data.self) else {
            return nil
        }
        return CIImage(data: data)
    }
}
